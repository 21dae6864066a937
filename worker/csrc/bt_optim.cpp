// bt's fused LARS step on the CPU. The recipe's optimizer (and bt's per-tensor path) runs a chain
// of whole-tensor ops per parameter: scale, add decay, two norms, scale by the trust ratio,
// momentum multiply-add, parameter update: about fifteen passes over memory per weight tensor,
// each a separate kernel. Here a weight tensor costs two passes (one reading p and g for both
// norms, one reading p, g, m and writing m and p) and a 1-D tensor one, all tensors in one call,
// each pass split over ATen's intra-op threads. Same arithmetic, in the same order, as
// `optim::lars` (fp32 elementwise; the norms accumulate in double). Tensors are walked as flat
// blocks in memory order, so channels-last weights (bf16 autocast runs) take the same path.
// Errors as in bt_error.h.
#include <array>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "bt_error.h"

namespace {

// Elements per task of the parallel loops (small tensors run on one thread).
constexpr int64_t kGrain = 32768;

// Every tensor must be a dense fp32 CPU block laid out like its parameter (contiguous, or
// channels-last with the same strides): then element j of the block is the same element in all
// three, and the kernel can walk them flat, whatever the memory format.
void check(const at::Tensor& t, const at::Tensor& like, const char* what, int i) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat &&
                  t.is_non_overlapping_and_dense(),
              "fused LARS: ", what, " ", i, " must be a dense fp32 CPU tensor");
  // The stride of a dimension of size 1 never moves the pointer: only the others must agree.
  bool same = t.sizes() == like.sizes();
  for (int64_t d = 0; same && d < t.dim(); ++d) {
    same = t.size(d) == 1 || t.stride(d) == like.stride(d);
  }
  TORCH_CHECK(same, "fused LARS: ", what, " ", i, " has sizes ", t.sizes(), " strides ",
              t.strides(), ", its parameter ", like.sizes(), " ", like.strides());
}

// Elements j in [b, e): (Σ p², Σ d²) with d = s·g + wd·p (s applied when kScaled), accumulated in
// double. Lanes of independent partial sums, folded at the end, let the loop run at the
// machine's add throughput instead of one add latency per element.
template <bool kScaled>
std::array<double, 2> norms_sq(const float* p, const float* g, float s, float wd, int64_t b, int64_t e) {
  constexpr int kLanes = 8;
  double pp[kLanes] = {};
  double dd[kLanes] = {};
  int64_t j = b;
  for (; j + kLanes <= e; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float gs = kScaled ? g[j + l] * s : g[j + l];
      const float d = gs + wd * p[j + l];
      pp[l] += static_cast<double>(p[j + l]) * p[j + l];
      dd[l] += static_cast<double>(d) * d;
    }
  }
  for (; j < e; ++j) {
    const float gs = kScaled ? g[j] * s : g[j];
    const float d = gs + wd * p[j];
    pp[0] += static_cast<double>(p[j]) * p[j];
    dd[0] += static_cast<double>(d) * d;
  }
  std::array<double, 2> out{0.0, 0.0};
  for (int l = 0; l < kLanes; ++l) {
    out[0] += pp[l];
    out[1] += dd[l];
  }
  return out;
}

}  // namespace

extern "C" {

// One LARS update of n parameters: params[i], their gradients grads[i] (a NULL or undefined
// gradient skips the parameter) and momentum buffers moms[i]; weight[i] != 0 for the weights
// group (decay and trust ratio, lr_w), 0 for 1-D tensors (lr_b).
char* bt_lars_step_cpu(at::Tensor** params, at::Tensor** grads, at::Tensor** moms,
                       const int* weight, int n, double scale, double weight_decay,
                       double momentum, double eta, double lr_w, double lr_b) {
  return bt_guarded([&] {
    const float s = static_cast<float>(scale);
    const float wd = static_cast<float>(weight_decay);
    const float mom = static_cast<float>(momentum);
    const bool scaled = scale != 1.0;
    for (int i = 0; i < n; ++i) {
      if (grads[i] == nullptr || !grads[i]->defined()) {
        continue;
      }
      const at::Tensor& pt = *params[i];
      check(pt, pt, "parameter", i);
      check(*grads[i], pt, "gradient", i);
      check(*moms[i], pt, "momentum", i);
      float* p = pt.data_ptr<float>();
      const float* g = grads[i]->data_ptr<float>();
      float* m = moms[i]->data_ptr<float>();
      const int64_t len = pt.numel();
      if (weight[i] == 0) {
        const float lr = static_cast<float>(lr_b);
        at::parallel_for(0, len, kGrain, [&](int64_t b, int64_t e) {
          for (int64_t j = b; j < e; ++j) {
            const float d = scaled ? g[j] * s : g[j];
            m[j] = m[j] * mom + d;
            p[j] = p[j] - lr * m[j];
          }
        });
        continue;
      }
      // ‖p‖² and ‖dp‖², dp = s·g + wd·p, in one pass.
      using Sums = std::array<double, 2>;
      const Sums sums = at::parallel_reduce(
          0, len, kGrain, Sums{0.0, 0.0},
          [&](int64_t b, int64_t e, Sums acc) {
            const Sums part = scaled ? norms_sq<true>(p, g, s, wd, b, e) : norms_sq<false>(p, g, s, wd, b, e);
            acc[0] += part[0];
            acc[1] += part[1];
            return acc;
          },
          [](Sums a, const Sums& b) {
            a[0] += b[0];
            a[1] += b[1];
            return a;
          });
      const float pn = static_cast<float>(std::sqrt(sums[0]));
      const float dn = static_cast<float>(std::sqrt(sums[1]));
      const float q = (pn > 0.0f && dn > 0.0f) ? static_cast<float>(eta) * (pn / dn) : 1.0f;
      const float lr = static_cast<float>(lr_w);
      at::parallel_for(0, len, kGrain, [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) {
          const float gs = scaled ? g[j] * s : g[j];
          const float d = (gs + wd * p[j]) * q;
          m[j] = m[j] * mom + d;
          p[j] = p[j] - lr * m[j];
        }
      });
    }
  });
}

}  // extern "C"
