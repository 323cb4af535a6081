// Autograd kernel of normkernels::sbn_forward (schema and contract: csrc/sbn.cpp; BN+SBN, or SBN
// with the BN stage off), in the style of torchvision's csrc/ops/autograd: a
// torch::autograd::Function registered at the Autograd key that calls the forward op below
// autograd and, in its backward, sbn_backward. Only x and the O(C) `saved` tensor are kept; the
// statistics outputs are not differentiable; absent parameters (the BN stage's with it off),
// inputs that do not require grad and an undefined output gradient (y unused) get undefined
// gradients, and the last launches nothing.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace normkernels {
namespace sbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Fwd6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Bwd5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using FwdOp = Fwd6(const Tensor&, bool, const OptTensor&, const OptTensor&, const OptTensor&,
                   const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                   const OptTensor&, double, double, c10::string_view, c10::string_view, double);
using BwdOp = Bwd5(const Tensor&, const Tensor&, const Tensor&, bool, bool, c10::string_view,
                   c10::string_view, double);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
bool wants_grad(const OptTensor& t) { return given(t) && t->requires_grad(); }

class SbnFunction : public torch::autograd::Function<SbnFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, bool bn,
                               const OptTensor& bn_weight, const OptTensor& bn_bias,
                               const OptTensor& bn_mean, const OptTensor& bn_var,
                               const OptTensor& sbn_weight, const OptTensor& sbn_bias,
                               const OptTensor& sbn_mean, const OptTensor& sbn_var, double bn_eps,
                               double sbn_eps, c10::string_view fft_norm, c10::string_view act,
                               double act_param) {
    static const auto op = find_op<FwdOp>("normkernels::sbn_forward");
    Tensor y, bm, bv, sm, sv, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, bm, bv, sm, sv, saved) =
          op.call(x, bn, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias, sbn_mean,
                  sbn_var, bn_eps, sbn_eps, fft_norm, act, act_param);
    }
    ctx->save_for_backward({x, saved});
    ctx->set_materialize_grads(false);  // y unused: no zero-filled dy, nothing launched
    auto& d = ctx->saved_data;
    d["bn"] = bn;
    d["training"] = !given(sbn_mean);  // eval: the statistics are given (sbn_mean in both modes)
    d["fft_norm"] = std::string(fft_norm.data(), fft_norm.size());
    d["act"] = std::string(act.data(), act.size());
    d["act_param"] = act_param;
    d["need_x"] = x.requires_grad();
    d["need_bn_weight"] = bn && wants_grad(bn_weight);
    d["need_bn_bias"] = bn && wants_grad(bn_bias);
    d["need_sbn_weight"] = wants_grad(sbn_weight);
    d["need_sbn_bias"] = wants_grad(sbn_bias);
    ctx->mark_non_differentiable({bm, bv, sm, sv, saved});
    return {y, bm, bv, sm, sv, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(15);  // one per forward argument
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    static const auto op = find_op<BwdOp>("normkernels::sbn_backward");
    const variable_list s = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    auto [dx, dbn_weight, dbn_bias, dsbn_weight, dsbn_bias] =
        op.call(dy, s[0], s[1], d.at("bn").toBool(), d.at("training").toBool(),
                d.at("fft_norm").toStringRef(), d.at("act").toStringRef(),
                d.at("act_param").toDouble());
    if (d.at("need_x").toBool()) out[0] = dx;
    if (d.at("need_bn_weight").toBool()) out[2] = dbn_weight;
    if (d.at("need_bn_bias").toBool()) out[3] = dbn_bias;
    if (d.at("need_sbn_weight").toBool()) out[6] = dsbn_weight;
    if (d.at("need_sbn_bias").toBool()) out[7] = dsbn_bias;
    return out;
  }
};

Fwd6 sbn_forward_autograd(const Tensor& x, bool bn, const OptTensor& bn_weight,
                          const OptTensor& bn_bias, const OptTensor& bn_mean,
                          const OptTensor& bn_var, const OptTensor& sbn_weight,
                          const OptTensor& sbn_bias, const OptTensor& sbn_mean,
                          const OptTensor& sbn_var, double bn_eps, double sbn_eps,
                          c10::string_view fft_norm, c10::string_view act, double act_param) {
  auto r = SbnFunction::apply(x, bn, bn_weight, bn_bias, bn_mean, bn_var, sbn_weight, sbn_bias,
                              sbn_mean, sbn_var, bn_eps, sbn_eps, fft_norm, act, act_param);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace
}  // namespace sbn
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, Autograd, m) {
  m.impl("sbn_forward", &normkernels::sbn::sbn_forward_autograd);
}
