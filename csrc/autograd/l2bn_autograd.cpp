// Autograd kernel of normkernels::l2bn_forward (torchvision csrc/ops/autograd style): a
// torch::autograd::Function registered at the Autograd key. Its forward calls the op below the
// autograd keys and saves x and `saved` (O(N*C), csrc/l2bn_finalize.h); its backward calls
// normkernels::l2bn_backward. The statistics and saved outputs are not differentiable; absent
// weight / bias and inputs that need no gradient get undefined gradients; an undefined dy (y
// unused) returns undefined gradients without running anything.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace normkernels {
namespace l2bn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using ForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    double, double, bool, c10::string_view, double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, bool,
    c10::string_view, double);

class L2BNFunction : public torch::autograd::Function<L2BNFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& mean, const OptTensor& var,
                               double eps, double l2_eps, bool rescale, c10::string_view act,
                               double act_param) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);  // no zero tensors for the unused output gradients
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("normkernels::l2bn_forward", "")
                         .typed<ForwardSig>();
    auto [y, batch_mean, batch_var, saved] =
        op.call(x, weight, bias, mean, var, eps, l2_eps, rescale, act, act_param);
    ctx->save_for_backward({x, saved, weight.has_value() ? *weight : at::Tensor()});
    ctx->saved_data["training"] = !mean.has_value();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["act"] = std::string(act.data(), act.size());
    ctx->saved_data["act_param"] = act_param;
    ctx->mark_non_differentiable({batch_mean, batch_var, saved});
    return {y, batch_mean, batch_var, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);  // one (undefined unless computed) per forward argument
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("normkernels::l2bn_backward", "")
                         .typed<BackwardSig>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    OptTensor weight;
    if (saved[2].defined()) weight = saved[2];
    const std::string act = ctx->saved_data["act"].toStringRef();
    auto [dx, dweight, dbias] =
        op.call(dy, x, weight, saved[1], ctx->saved_data["training"].toBool(),
                c10::string_view(act.data(), act.size()), ctx->saved_data["act_param"].toDouble());
    if (ctx->needs_input_grad(0)) out[0] = dx;
    if (weight.has_value() && ctx->needs_input_grad(1)) out[1] = dweight;
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) out[2] = dbias;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_autograd(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
    const OptTensor& var, double eps, double l2_eps, bool rescale, c10::string_view act,
    double act_param) {
  auto r = L2BNFunction::apply(x, weight, bias, mean, var, eps, l2_eps, rescale, act, act_param);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace
}  // namespace l2bn
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, Autograd, m) {
  m.impl("l2bn_forward", &normkernels::l2bn::forward_autograd);
}
