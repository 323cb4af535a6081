// Autograd kernels of normkernels::sbn_forward and normkernels::bnsbn_forward (schemas and
// contracts: csrc/sbn.cpp), in the style of torchvision's csrc/ops/autograd: a
// torch::autograd::Function registered at the Autograd key that calls the forward op below
// autograd and, in its backward, the backward op. Only x and the O(C) `saved` tensor are kept; the
// statistics outputs are not differentiable; absent parameters, inputs that do not require grad and
// an undefined output gradient (y unused) get undefined gradients, and the last launches nothing.
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

using SbnFwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double,
    c10::string_view, c10::string_view, double);
using SbnBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                  bool, c10::string_view, c10::string_view,
                                                  double);
using BnSbnFwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, double,
    c10::string_view, c10::string_view, double);
using BnSbnBwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, bool, c10::string_view, c10::string_view, double);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
bool wants_grad(const OptTensor& t) { return given(t) && t->requires_grad(); }

// What the backward needs besides the saved tensors.
void save_common(AutogradContext* ctx, bool training, c10::string_view fft_norm,
                 c10::string_view act, double act_param) {
  ctx->set_materialize_grads(false);  // y unused: no zero-filled dy, nothing launched
  ctx->saved_data["training"] = training;
  ctx->saved_data["fft_norm"] = std::string(fft_norm.data(), fft_norm.size());
  ctx->saved_data["act"] = std::string(act.data(), act.size());
  ctx->saved_data["act_param"] = act_param;
}

class SbnFunction : public torch::autograd::Function<SbnFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& mean,
                               const OptTensor& var, double eps, c10::string_view fft_norm,
                               c10::string_view act, double act_param) {
    static const auto op = find_op<SbnFwd>("normkernels::sbn_forward");
    Tensor y, m, v, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, m, v, saved) =
          op.call(x, weight, bias, mean, var, eps, fft_norm, act, act_param);
    }
    ctx->save_for_backward({x, saved});
    save_common(ctx, !given(mean), fft_norm, act, act_param);
    ctx->saved_data["need_x"] = x.requires_grad();
    ctx->saved_data["need_w"] = wants_grad(weight);
    ctx->saved_data["need_b"] = wants_grad(bias);
    ctx->mark_non_differentiable({m, v, saved});
    return {y, m, v, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);  // one per forward argument
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    static const auto op = find_op<SbnBwd>("normkernels::sbn_backward");
    const variable_list s = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    auto [dx, dw, db] = op.call(dy, s[0], s[1], d.at("training").toBool(),
                                d.at("fft_norm").toStringRef(), d.at("act").toStringRef(),
                                d.at("act_param").toDouble());
    if (d.at("need_x").toBool()) out[0] = dx;
    if (d.at("need_w").toBool()) out[1] = dw;
    if (d.at("need_b").toBool()) out[2] = db;
    return out;
  }
};

class BnSbnFunction : public torch::autograd::Function<BnSbnFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& bn_w,
                               const OptTensor& bn_b, const OptTensor& bn_mean,
                               const OptTensor& bn_var, const OptTensor& sbn_w,
                               const OptTensor& sbn_b, const OptTensor& sbn_mean,
                               const OptTensor& sbn_var, double bn_eps, double sbn_eps,
                               c10::string_view fft_norm, c10::string_view act,
                               double act_param) {
    static const auto op = find_op<BnSbnFwd>("normkernels::bnsbn_forward");
    Tensor y, bm, bv, sm, sv, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, bm, bv, sm, sv, saved) =
          op.call(x, bn_w, bn_b, bn_mean, bn_var, sbn_w, sbn_b, sbn_mean, sbn_var, bn_eps,
                  sbn_eps, fft_norm, act, act_param);
    }
    ctx->save_for_backward({x, saved});
    save_common(ctx, !given(bn_mean), fft_norm, act, act_param);
    ctx->saved_data["need_x"] = x.requires_grad();
    ctx->saved_data["need_bw"] = wants_grad(bn_w);
    ctx->saved_data["need_bb"] = wants_grad(bn_b);
    ctx->saved_data["need_sw"] = wants_grad(sbn_w);
    ctx->saved_data["need_sb"] = wants_grad(sbn_b);
    ctx->mark_non_differentiable({bm, bv, sm, sv, saved});
    return {y, bm, bv, sm, sv, saved};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(14);  // one per forward argument
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    static const auto op = find_op<BnSbnBwd>("normkernels::bnsbn_backward");
    const variable_list s = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    auto [dx, dgb, dbb, dgs, dbs] =
        op.call(dy, s[0], s[1], d.at("training").toBool(), d.at("fft_norm").toStringRef(),
                d.at("act").toStringRef(), d.at("act_param").toDouble());
    if (d.at("need_x").toBool()) out[0] = dx;
    if (d.at("need_bw").toBool()) out[1] = dgb;
    if (d.at("need_bb").toBool()) out[2] = dbb;
    if (d.at("need_sw").toBool()) out[5] = dgs;
    if (d.at("need_sb").toBool()) out[6] = dbs;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> sbn_forward_autograd(
    const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& mean,
    const OptTensor& var, double eps, c10::string_view fft_norm, c10::string_view act,
    double act_param) {
  auto r = SbnFunction::apply(x, weight, bias, mean, var, eps, fft_norm, act, act_param);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bnsbn_forward_autograd(
    const Tensor& x, const OptTensor& bn_w, const OptTensor& bn_b, const OptTensor& bn_mean,
    const OptTensor& bn_var, const OptTensor& sbn_w, const OptTensor& sbn_b,
    const OptTensor& sbn_mean, const OptTensor& sbn_var, double bn_eps, double sbn_eps,
    c10::string_view fft_norm, c10::string_view act, double act_param) {
  auto r = BnSbnFunction::apply(x, bn_w, bn_b, bn_mean, bn_var, sbn_w, sbn_b, sbn_mean, sbn_var,
                                bn_eps, sbn_eps, fft_norm, act, act_param);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace
}  // namespace sbn
}  // namespace normkernels

TORCH_LIBRARY_IMPL(normkernels, Autograd, m) {
  m.impl("sbn_forward", &normkernels::sbn::sbn_forward_autograd);
  m.impl("bnsbn_forward", &normkernels::sbn::bnsbn_forward_autograd);
}
