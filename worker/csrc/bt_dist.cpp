// bt c10d shim: a process group (TCPStore rendezvous + Gloo, or NCCL with the `nccl` feature),
// the collectives the trainer needs, bucketed gradient all-reduce, and synchronized batch norm
// as an autograd function. Every entry point is `extern "C"`, catches every C++ exception and
// returns it as a heap-allocated error string (NULL on success; the caller frees it with
// bt_dist_free_error). Tensors cross the boundary as tch's handles (pointers to at::Tensor).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "bt_error.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

// One process group: the store it met on and the backend that runs the collectives.
// Reference counted so an autograd node (SyncBN backward) keeps it alive after Rust drops it.
struct Group : torch::CustomClassHolder {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank = 0;
  int world = 1;
  bool nccl = false;
  std::chrono::milliseconds timeout{0};
  // Collectives must be issued in the same order on every rank; serialize this process's calls
  // (Rust threads and the autograd engine may both issue them).
  std::mutex mu;
};

struct Handle {
  c10::intrusive_ptr<Group> g;
};

void wait_work(Group& g, const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait();
#ifdef USE_C10D_NCCL
  if (g.nccl) {
    // wait() only orders the current stream after the collective; callers of this API expect
    // the result to be ready (and errors to surface) when the call returns.
    c10::cuda::device_synchronize();
  }
#else
  (void)g;
#endif
}

void check_device(const Group& g, const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.defined(), what, ": undefined tensor");
  if (g.nccl) {
    TORCH_CHECK(t.is_cuda(), what, ": the NCCL process group needs CUDA tensors, got ", t.device());
  } else {
    TORCH_CHECK(t.is_cpu(), what, ": the Gloo process group needs CPU tensors, got ", t.device());
  }
}

// In-place sum of `t` over all ranks (contiguous staging copy when needed).
void allreduce_inplace(Group& g, at::Tensor t) {
  at::NoGradGuard ng;
  check_device(g, t, "all_reduce");
  at::Tensor buf = t.is_contiguous() ? t : t.contiguous();
  std::vector<at::Tensor> ts{buf};
  {
    std::lock_guard<std::mutex> lock(g.mu);
    wait_work(g, g.backend->allreduce(ts, c10d::AllreduceOptions()));
  }
  if (!buf.is_same(t)) {
    t.copy_(buf);
  }
}

void broadcast_inplace(Group& g, at::Tensor t, int root) {
  at::NoGradGuard ng;
  check_device(g, t, "broadcast");
  TORCH_CHECK(root >= 0 && root < g.world, "broadcast: root ", root, " is not a rank of a group of ", g.world);
  at::Tensor buf = t.is_contiguous() ? t : t.contiguous();
  std::vector<at::Tensor> ts{buf};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  {
    std::lock_guard<std::mutex> lock(g.mu);
    wait_work(g, g.backend->broadcast(ts, opts));
  }
  if (!buf.is_same(t)) {
    t.copy_(buf);
  }
}

at::Tensor allgather(Group& g, const at::Tensor& t) {
  at::NoGradGuard ng;
  check_device(g, t, "all_gather");
  TORCH_CHECK(t.dim() >= 1, "all_gather: needs a tensor with at least one dimension");
  at::Tensor in = t.detach().contiguous();
  std::vector<int64_t> sizes = in.sizes().vec();
  sizes[0] *= g.world;
  at::Tensor out = at::empty(sizes, in.options());
  {
    std::lock_guard<std::mutex> lock(g.mu);
    wait_work(g, g.backend->_allgather_base(out, in, c10d::AllgatherOptions()));
  }
  return out;
}

// All-gather into a caller-owned `out` of shape [world·n, ...] (no allocation per call).
void allgather_into(Group& g, const at::Tensor& t, at::Tensor& out) {
  at::NoGradGuard ng;
  check_device(g, t, "all_gather");
  check_device(g, out, "all_gather output");
  TORCH_CHECK(t.dim() >= 1, "all_gather: needs a tensor with at least one dimension");
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[0] *= g.world;
  TORCH_CHECK(out.sizes().vec() == sizes && out.scalar_type() == t.scalar_type() && out.is_contiguous(),
      "all_gather: output must be a contiguous ", t.scalar_type(), " tensor of shape ", at::IntArrayRef(sizes),
      ", got ", out.scalar_type(), " ", out.sizes());
  at::Tensor in = t.detach().contiguous();
  std::lock_guard<std::mutex> lock(g.mu);
  wait_work(g, g.backend->_allgather_base(out, in, c10d::AllgatherOptions()));
}

// Persistent gradient buckets: each parameter's .grad is made an alias of a slice of a flat
// bucket buffer (with the parameter's own strides), so autograd accumulates straight into the
// buckets and the all-reduce needs no packing copies. A grad that someone replaced since (a
// different tensor) is copied in and re-aliased before its bucket is summed, so the result is
// right either way; a parameter without a grad contributes zeros.
//
// Buckets are laid out over the parameters in reverse order (backward reaches the last ones
// first). With overlap on, a post-accumulate-grad hook on every parameter counts the distinct
// parameters of its bucket whose gradient is complete in this step; once a whole bucket is, its
// all-reduce is started (asynchronously) from the hook, in the middle of backward, but only after
// every earlier bucket's: bucket k waits for buckets 0..k-1, so the collectives are issued in the
// same order on every rank. Hooks act only between arm() and the all-reduce that ends the step
// (the one backward whose gradients are summed); all_reduce() starts the buckets still waiting
// (parameters without a gradient this step) in order and waits for every one.
struct GradBuckets;

// The hook on one parameter. It holds the buckets weakly: once they are freed it does nothing.
struct BucketHook : torch::autograd::PostAccumulateGradHook {
  BucketHook(std::weak_ptr<GradBuckets> owner, size_t index) : owner(std::move(owner)), index(index) {}
  void operator()(const torch::autograd::Variable& param) override;
  std::weak_ptr<GradBuckets> owner;
  size_t index;
};

struct Bucket {
  at::Tensor buf;
  // {buf}: the backend takes a vector by reference.
  std::vector<at::Tensor> io;
  // Parameter indices, in bucket order.
  std::vector<size_t> members;
  // Members whose gradient is not yet complete in this step.
  size_t pending = 0;
  // Started in this step, not waited for yet.
  c10::intrusive_ptr<c10d::Work> work;
};

struct GradBuckets {
  c10::intrusive_ptr<Group> g;
  std::vector<at::Tensor> params;
  std::vector<Bucket> buckets;
  // per parameter: bucket index and element offset
  std::vector<std::pair<size_t, int64_t>> where;
  // Serializes the hooks (on autograd's threads) with arm/all_reduce/set_overlap.
  std::mutex mu;
  bool overlap = false;
  bool hooks_installed = false;
  // Per step.
  bool armed = false;
  std::vector<uint8_t> ready;
  // buckets[0..next) are started.
  size_t next = 0;
  // Set when a gradient arrived for a bucket already being summed (a second backward in one step).
  bool late = false;
};

at::Tensor alias_slice(const at::Tensor& buf, int64_t off, const at::Tensor& like) {
  at::Tensor v = at::empty({0}, buf.options());
  if (like.is_non_overlapping_and_dense()) {
    v.set_(buf.storage(), buf.storage_offset() + off, like.sizes(), like.strides());
  } else {
    v.set_(buf.storage(), buf.storage_offset() + off, like.sizes(), c10::contiguous_strides(like.sizes()));
  }
  return v;
}

bool aliases(const at::Tensor& grad, const at::Tensor& buf, int64_t off) {
  return grad.defined() && grad.data_ptr() == static_cast<char*>(buf.data_ptr()) + off * buf.element_size();
}

std::shared_ptr<GradBuckets> grad_buckets_new(c10::intrusive_ptr<Group> g, std::vector<at::Tensor> params, int64_t bucket_bytes) {
  at::NoGradGuard ng;
  auto b = std::make_shared<GradBuckets>();
  b->g = std::move(g);
  b->params = std::move(params);
  const auto& ps = b->params;
  const size_t n = ps.size();
  b->where.resize(n);
  b->ready.assign(n, 0);
  // Bucket over the reversed list: order[r] is the r-th parameter backward is expected to reach.
  std::vector<size_t> order(n);
  for (size_t r = 0; r < n; ++r) {
    order[r] = n - 1 - r;
  }
  size_t i = 0;
  while (i < n) {
    const at::Tensor& first = ps[order[i]];
    size_t j = i;
    int64_t bytes = 0;
    while (j < n && ps[order[j]].scalar_type() == first.scalar_type() && ps[order[j]].device() == first.device()) {
      int64_t nb = ps[order[j]].numel() * static_cast<int64_t>(ps[order[j]].element_size());
      if (j > i && bytes + nb > bucket_bytes) {
        break;
      }
      bytes += nb;
      ++j;
    }
    int64_t total = 0;
    for (size_t k = i; k < j; ++k) {
      total += ps[order[k]].numel();
    }
    Bucket bucket;
    bucket.buf = at::zeros({total}, first.options().requires_grad(false));
    bucket.io = {bucket.buf};
    int64_t off = 0;
    for (size_t k = i; k < j; ++k) {
      const at::Tensor& p = ps[order[k]];
      at::Tensor view = alias_slice(bucket.buf, off, p);
      if (p.grad().defined()) {
        view.copy_(p.grad());
      }
      const_cast<at::Tensor&>(p).mutable_grad() = view;
      b->where[order[k]] = {b->buckets.size(), off};
      bucket.members.push_back(order[k]);
      off += p.numel();
    }
    bucket.pending = bucket.members.size();
    b->buckets.push_back(std::move(bucket));
    i = j;
  }
  return b;
}

// Makes parameter k's grad the alias of its slice again (copying a replaced grad in, zeros for
// none).
void realias(GradBuckets& b, size_t k) {
  const at::Tensor& p = b.params[k];
  auto [bi, off] = b.where[k];
  const at::Tensor& buf = b.buckets[bi].buf;
  if (!aliases(p.grad(), buf, off)) {
    at::Tensor view = alias_slice(buf, off, p);
    if (p.grad().defined()) {
      view.copy_(p.grad());
    } else {
      view.zero_();
    }
    const_cast<at::Tensor&>(p).mutable_grad() = view;
  }
}

// Starts bucket b.next's all-reduce. Caller holds b.mu.
void launch_next(GradBuckets& b) {
  at::NoGradGuard ng;
  Bucket& bucket = b.buckets[b.next];
  for (size_t k : bucket.members) {
    realias(b, k);
  }
  check_device(*b.g, bucket.buf, "gradient all_reduce");
  {
    std::lock_guard<std::mutex> lock(b.g->mu);
    bucket.work = b.g->backend->allreduce(bucket.io, c10d::AllreduceOptions());
  }
  ++b.next;
}

// Per-step state back to the start (no bucket started, nothing ready, not armed). Caller holds
// b.mu.
void reset_step(GradBuckets& b) {
  for (auto& bucket : b.buckets) {
    bucket.pending = bucket.members.size();
    bucket.work.reset();
  }
  std::fill(b.ready.begin(), b.ready.end(), 0);
  b.next = 0;
  b.armed = false;
  b.late = false;
}

// Waits for every started bucket; the first failure is rethrown after all were waited for.
// Caller holds b.mu.
void wait_started(GradBuckets& b) {
  std::exception_ptr first;
  bool any = false;
  for (size_t k = 0; k < b.next; ++k) {
    auto& work = b.buckets[k].work;
    if (!work) {
      continue;
    }
    any = true;
    try {
      work->wait();
    } catch (...) {
      if (!first) {
        first = std::current_exception();
      }
    }
    work.reset();
  }
#ifdef USE_C10D_NCCL
  if (any && b.g->nccl && !first) {
    // wait() only orders the current stream after the collective; the sums are ready on return.
    c10::cuda::device_synchronize();
  }
#else
  (void)any;
#endif
  if (first) {
    std::rethrow_exception(first);
  }
}

void BucketHook::operator()(const torch::autograd::Variable& /*param*/) {
  auto b = owner.lock();
  if (!b) {
    return; // the buckets were freed
  }
  std::lock_guard<std::mutex> lock(b->mu);
  if (!b->armed || !b->overlap) {
    return;
  }
  const size_t bi = b->where[index].first;
  if (b->ready[index]) {
    // Counted already: a second backward in this step. Harmless until the bucket has started;
    // after that the gradient landed in a buffer being summed.
    if (bi < b->next) {
      b->late = true;
    }
    return;
  }
  b->ready[index] = 1;
  --b->buckets[bi].pending;
  while (b->next < b->buckets.size() && b->buckets[b->next].pending == 0) {
    launch_next(*b);
  }
}

void grad_buckets_set_overlap(const std::shared_ptr<GradBuckets>& b, bool on) {
  std::lock_guard<std::mutex> lock(b->mu);
  if (on && !b->hooks_installed) {
    for (size_t k = 0; k < b->params.size(); ++k) {
      const at::Tensor& p = b->params[k];
      if (p.requires_grad() && p.is_leaf()) {
        torch::autograd::impl::set_post_acc_grad_hooks(p, std::make_unique<BucketHook>(b, k));
      }
    }
    b->hooks_installed = true;
  }
  b->overlap = on;
}

// Removes the hooks that are still this set's (before the last reference goes).
void grad_buckets_remove_hooks(const std::shared_ptr<GradBuckets>& b) {
  if (!b->hooks_installed) {
    return;
  }
  for (const auto& p : b->params) {
    if (!(p.requires_grad() && p.is_leaf())) {
      continue;
    }
    auto& hook = torch::autograd::impl::post_acc_grad_hooks(p);
    auto* mine = dynamic_cast<BucketHook*>(hook.get());
    if (mine != nullptr && mine->owner.lock() == b) {
      hook.reset();
    }
  }
  b->hooks_installed = false;
}

// Runs `body` (which starts and/or waits for buckets), then clears the step's state whether it
// threw or not; on a throw the buckets already started are waited for first (best effort; a no-op
// when `body` threw from wait_started, which waits for all before rethrowing), so that no
// all-reduce is left writing into a gradient. Caller holds b.mu.
template <typename Body>
void step_then_reset(GradBuckets& b, Body body) {
  try {
    body();
  } catch (...) {
    try {
      wait_started(b);
    } catch (...) {
    }
    reset_step(b);
    throw;
  }
  reset_step(b);
}

// Ends any unfinished step (waiting for what it started) and lets the hooks of the next backward
// start the buckets.
void grad_buckets_arm(GradBuckets& b) {
  std::lock_guard<std::mutex> lock(b.mu);
  step_then_reset(b, [&] { wait_started(b); });
  b.armed = b.overlap;
}

// Starts the buckets not started yet, in order, and waits for all of them.
void grad_buckets_allreduce(GradBuckets& b) {
  std::lock_guard<std::mutex> lock(b.mu);
  const bool late = b.late;
  step_then_reset(b, [&] {
    while (b.next < b.buckets.size()) {
      launch_next(b);
    }
    wait_started(b);
  });
  TORCH_CHECK(
      !late,
      "a gradient was accumulated into a bucket whose all-reduce had already started (more than "
      "one backward between arm() and all_reduce()?); the summed gradients are unreliable");
}

// Packs `tensors` into flat buffers of at most `bucket_bytes` (one tensor larger than that gets a
// bucket of its own), grouped by dtype and device in order, and runs `op` on each buffer.
template <typename Op>
void bucketed(Group& g, const std::vector<at::Tensor>& tensors, int64_t bucket_bytes, Op op) {
  at::NoGradGuard ng;
  size_t i = 0;
  while (i < tensors.size()) {
    const at::Tensor& first = tensors[i];
    size_t j = i;
    int64_t bytes = 0;
    while (j < tensors.size()) {
      const at::Tensor& t = tensors[j];
      if (t.scalar_type() != first.scalar_type() || t.device() != first.device()) {
        break;
      }
      int64_t nb = t.numel() * static_cast<int64_t>(t.element_size());
      if (j > i && bytes + nb > bucket_bytes) {
        break;
      }
      bytes += nb;
      ++j;
    }
    std::vector<at::Tensor> flat;
    flat.reserve(j - i);
    for (size_t k = i; k < j; ++k) {
      flat.push_back(tensors[k].reshape({-1}));
    }
    at::Tensor buf = at::cat(flat);
    op(buf);
    int64_t off = 0;
    for (size_t k = i; k < j; ++k) {
      const at::Tensor& t = tensors[k];
      int64_t n = t.numel();
      t.copy_(buf.narrow(0, off, n).view(t.sizes()));
      off += n;
    }
    i = j;
  }
}

at::Tensor stat_shape_view(const at::Tensor& v, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = v.size(0);
  return v.view(shape);
}

// Synchronized batch norm (training mode). Forward: every rank contributes per-channel sums of
// x and x^2 and its sample count; the global mean and biased variance normalize; the running
// statistics take the unbiased global variance (like torch.nn.SyncBatchNorm). Backward:
// all-reduces sum(dy) and sum(dy * xhat) per channel; weight and bias get this rank's share
// (summing over ranks gives the global gradient).
//
// The per-channel passes over the activations are ATen's own fused batch-norm kernels (vectorized,
// channels-last aware, bf16 inputs with float statistics): local statistics from
// batch_norm_update_stats, the normalization from eval-mode batch_norm with the global statistics,
// the backward's sums from eval-mode native_batch_norm_backward. Only the input gradient, which
// needs the global sums, is plain arithmetic (in float). Composing these from generic
// element-wise ops cost about 20x more on the demo's 2-core CPU.
// Passed to the autograd function as a non-tensor argument: running statistics are buffers
// updated in place, not inputs of the graph.
struct RunningStats {
  at::Tensor mean;
  at::Tensor var;
};

// The float type the statistics live in: the parameters' type, or float for a half/bf16 input
// without parameters (what ATen's mixed-type batch norm takes).
at::ScalarType stat_type(const at::Tensor& input, const at::Tensor& weight) {
  if (weight.defined()) {
    return weight.scalar_type();
  }
  const bool low = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  return low ? at::kFloat : input.scalar_type();
}

// The input gradient of the synchronized batch norm on CPU in one pass over dy and x:
// dx = fma(x - mean, b, fma(dy, a, d)) per channel, in float (the statistics' type), written in
// the input's type. This is the generic form's arithmetic exactly (ATen's addcmul is a fused
// multiply-add on CPUs with FMA), so the values are unchanged to the bit; the generic form
// (x - mean, then two addcmuls, with casts for bf16) makes four more passes over the
// activations and two more tensors of their size. It is the part of SyncBN's backward that a
// single rank's batch norm does not pay.
//
// Two layouts: whole planes per (sample, channel) (contiguous, 3 or more dimensions), or the
// channels innermost (2 dimensions, or channels-last), for float inputs, or bf16 ones with
// float statistics.
struct GradInputArgs {
  const void* dy;
  const void* x;
  void* dx;
  const float* mean;
  const float* a;
  const float* b;
  const float* d;
  int64_t c;
  int64_t plane;
};

// One element of dx, given dy (g) and x (v) as floats and its channel's coefficients.
inline __attribute__((always_inline)) float grad_value(float g, float v, float a, float b, float d, float mean) {
  return __builtin_fmaf(v - mean, b, __builtin_fmaf(g, a, d));
}

// Rows [begin, end) of c values each (one per sample and position: channels innermost).
template <typename T>
inline __attribute__((always_inline)) void grad_input_rows(const GradInputArgs& p, int64_t begin, int64_t end) {
  const int64_t c = p.c;
  for (int64_t r = begin; r < end; ++r) {
    const T* g = static_cast<const T*>(p.dy) + r * c;
    const T* v = static_cast<const T*>(p.x) + r * c;
    T* o = static_cast<T*>(p.dx) + r * c;
    for (int64_t k = 0; k < c; ++k) {
      o[k] = static_cast<T>(grad_value(g[k], v[k], p.a[k], p.b[k], p.d[k], p.mean[k]));
    }
  }
}

// Planes [begin, end) of `plane` values each (one per sample and channel).
template <typename T>
inline __attribute__((always_inline)) void grad_input_planes(const GradInputArgs& p, int64_t begin, int64_t end) {
  const int64_t plane = p.plane;
  for (int64_t q = begin; q < end; ++q) {
    const int64_t k = q % p.c;
    const float ak = p.a[k], bk = p.b[k], dk = p.d[k], mk = p.mean[k];
    const T* g = static_cast<const T*>(p.dy) + q * plane;
    const T* v = static_cast<const T*>(p.x) + q * plane;
    T* o = static_cast<T*>(p.dx) + q * plane;
    for (int64_t i = 0; i < plane; ++i) {
      o[i] = static_cast<T>(grad_value(g[i], v[i], ak, bk, dk, mk));
    }
  }
}

// One chunk of rows (`rows`) or planes. On x86-64 the loops are compiled twice: for CPUs with
// AVX2 and FMA (fused multiply-adds in vector registers) and for the baseline (fmaf from libm,
// the same values, slower), chosen at run time.
using GradInputChunk = void (*)(const GradInputArgs&, bool rows, int64_t begin, int64_t end);

#define BT_GRAD_INPUT_CHUNKS(ATTR, SUFFIX)                                                            \
  ATTR void grad_input_f32##SUFFIX(const GradInputArgs& p, bool rows, int64_t b, int64_t e) {        \
    rows ? grad_input_rows<float>(p, b, e) : grad_input_planes<float>(p, b, e);                      \
  }                                                                                                  \
  ATTR void grad_input_bf16##SUFFIX(const GradInputArgs& p, bool rows, int64_t b, int64_t e) {       \
    rows ? grad_input_rows<at::BFloat16>(p, b, e) : grad_input_planes<at::BFloat16>(p, b, e);        \
  }

BT_GRAD_INPUT_CHUNKS(, _base)
#if defined(__x86_64__)
BT_GRAD_INPUT_CHUNKS(__attribute__((target("avx2,fma"))), _fma)
#endif
#undef BT_GRAD_INPUT_CHUNKS

GradInputChunk grad_input_chunk(bool bf16) {
#if defined(__x86_64__)
  static const bool fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (fma) {
    return bf16 ? grad_input_bf16_fma : grad_input_f32_fma;
  }
#endif
  return bf16 ? grad_input_bf16_base : grad_input_f32_base;
}

// Returns an undefined tensor for what the loops do not take (other types, devices or layouts);
// the caller falls back to the generic form.
at::Tensor fused_grad_input(
    const at::Tensor& dy,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& a,
    const at::Tensor& b,
    const at::Tensor& d) {
  if (!input.device().is_cpu() || mean.scalar_type() != at::kFloat || dy.scalar_type() != input.scalar_type()) {
    return at::Tensor();
  }
  const at::ScalarType t = input.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16) {
    return at::Tensor();
  }
  bool channels_inner;
  if (input.dim() == 2 && input.is_contiguous() && dy.is_contiguous()) {
    channels_inner = true;
  } else if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast) &&
             dy.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous()) {
    channels_inner = true;
  } else if (input.dim() >= 3 && input.is_contiguous() && dy.is_contiguous()) {
    channels_inner = false;
  } else {
    return at::Tensor();
  }
  at::Tensor dx = at::empty_like(input, channels_inner && input.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous);
  const at::Tensor m = mean.contiguous(), ac = a.contiguous(), bc = b.contiguous(), dc = d.contiguous();
  const int64_t c = input.size(1);
  const int64_t n = input.size(0);
  GradInputArgs p{dy.data_ptr(), input.data_ptr(), dx.data_ptr(),
                  m.const_data_ptr<float>(), ac.const_data_ptr<float>(), bc.const_data_ptr<float>(),
                  dc.const_data_ptr<float>(), c, (n > 0 && c > 0) ? input.numel() / (n * c) : 0};
  const GradInputChunk chunk = grad_input_chunk(t == at::kBFloat16);
  // Rows of c values (one per sample and position), or planes (one per sample and channel).
  const int64_t units = channels_inner ? n * p.plane : n * c;
  const int64_t per_unit = std::max<int64_t>(channels_inner ? c : p.plane, 1);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / per_unit);
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) { chunk(p, channels_inner, begin, end); });
  return dx;
}

struct SyncBatchNormFn : public torch::autograd::Function<SyncBatchNormFn> {
  // `inputs` are views of one batch (Barlow Twins' two augmentations) through the same layer:
  // each is normalized with its own global statistics, but one all-reduce carries every view's
  // sums (and one more their gradients' in backward), so the ranks meet once per layer, not once
  // per view. The running statistics take the views in order, as separate calls would.
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      at::TensorList inputs,
      const std::optional<at::Tensor>& weight_opt,
      const std::optional<at::Tensor>& bias_opt,
      c10::intrusive_ptr<Group> group,
      RunningStats running,
      double momentum,
      double eps) {
    Group& g = *group;
    const at::Tensor weight = weight_opt.value_or(at::Tensor());
    const at::Tensor bias = bias_opt.value_or(at::Tensor());
    at::Tensor& running_mean = running.mean;
    at::Tensor& running_var = running.var;
    const size_t k = inputs.size();
    TORCH_CHECK(k >= 1, "sync_batch_norm: no input");
    TORCH_CHECK(inputs[0].dim() >= 2, "sync_batch_norm: input needs at least 2 dimensions, got ", inputs[0].sizes());
    const int64_t c = inputs[0].size(1);
    for (const at::Tensor& x : inputs) {
      TORCH_CHECK(x.dim() >= 2 && x.size(1) == c && x.scalar_type() == inputs[0].scalar_type(),
                  "sync_batch_norm: views must share the channel count and type, got ", x.sizes(), " ",
                  x.scalar_type(), " and ", inputs[0].sizes(), " ", inputs[0].scalar_type());
    }
    const at::ScalarType st = stat_type(inputs[0], weight);
    const at::TensorOptions sopts = inputs[0].options().dtype(st);

    // Per view and rank, mean and biased variance turned into sum and sum of squares in float64
    // for the reduction: [sum_x (C), sum_x2 (C), count (1)] per view. batch_norm_update_stats
    // also folds the batch into the running statistics it is given: momentum 0 leaves these
    // scratch ones as they are.
    const int64_t per_view = 2 * c + 1;
    at::Tensor stats = at::zeros({static_cast<int64_t>(k) * per_view}, inputs[0].options().dtype(at::kDouble));
    for (size_t v = 0; v < k; ++v) {
      const at::Tensor& input = inputs[v];
      const int64_t n_local = c > 0 ? input.numel() / c : 0;
      if (n_local > 0) {
        at::Tensor scratch_mean = at::zeros({c}, sopts);
        at::Tensor scratch_var = at::ones({c}, sopts);
        auto mv = at::batch_norm_update_stats(input, scratch_mean, scratch_var, 0.0);
        at::Tensor mean_l = std::get<0>(mv).to(at::kDouble);
        at::Tensor var_l = std::get<1>(mv).to(at::kDouble);
        double n = static_cast<double>(n_local);
        at::Tensor s = stats.narrow(0, static_cast<int64_t>(v) * per_view, per_view);
        s.narrow(0, 0, c).copy_(mean_l * n);
        s.narrow(0, c, c).copy_((var_l + mean_l * mean_l) * n);
        s.narrow(0, 2 * c, 1).fill_(n);
      }
    }
    allreduce_inplace(g, stats);
    // Every view's global count, read back at once (one device sync on CUDA, not one per view);
    // identical on all ranks after the reduction.
    const at::Tensor counts = stats.view({static_cast<int64_t>(k), per_view}).select(1, 2 * c).to(at::kCPU).contiguous();
    const double* count = counts.const_data_ptr<double>();

    torch::autograd::variable_list outs;
    torch::autograd::variable_list to_save(inputs.begin(), inputs.end());
    to_save.push_back(weight);
    std::vector<double> n_totals;
    for (size_t v = 0; v < k; ++v) {
      at::Tensor s = stats.narrow(0, static_cast<int64_t>(v) * per_view, per_view);
      const double n_total = count[v];
      TORCH_CHECK(n_total > 1, "sync_batch_norm: expected more than 1 value per channel over the global batch, got ", n_total);
      at::Tensor mean_d = s.narrow(0, 0, c) / n_total;
      at::Tensor var_d = (s.narrow(0, c, c) / n_total - mean_d * mean_d).clamp_min(0.0);
      {
        at::NoGradGuard ng;
        if (running_mean.defined()) {
          running_mean.mul_(1.0 - momentum).add_(mean_d.to(running_mean.scalar_type()), momentum);
        }
        if (running_var.defined()) {
          at::Tensor unbiased = var_d * (n_total / (n_total - 1.0));
          running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.scalar_type()), momentum);
        }
      }
      at::Tensor mean = mean_d.to(st);
      at::Tensor var = var_d.to(st);
      {
        // Eval-mode batch norm with the global statistics is exactly the normalization wanted;
        // the gradient is this function's own.
        at::NoGradGuard ng;
        outs.push_back(at::batch_norm(inputs[v], weight, bias, mean, var, /*training=*/false, 0.0, eps,
                                      /*cudnn_enabled=*/false));
      }
      to_save.push_back(mean);
      to_save.push_back(var);
      n_totals.push_back(n_total);
    }

    // Saved: the k inputs, the weight, then mean and variance per view.
    ctx->save_for_backward(to_save);
    ctx->saved_data["group"] = c10::IValue::make_capsule(group);
    ctx->saved_data["n_totals"] = n_totals;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.defined();
    return outs;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const size_t k = grad_outputs.size();
    at::Tensor weight = saved[k];
    auto holder = ctx->saved_data["group"].toCapsule();
    auto group = c10::static_intrusive_pointer_cast<Group>(holder);
    const std::vector<double> n_totals = ctx->saved_data["n_totals"].toDoubleVector();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();

    at::NoGradGuard ng;
    const int64_t c = saved[0].size(1);
    // View v's global mean and variance, as forward saved them (in the statistics' type).
    auto mean_of = [&](size_t v) -> const at::Tensor& { return saved[k + 1 + 2 * v]; };
    auto var_of = [&](size_t v) -> const at::Tensor& { return saved[k + 2 + 2 * v]; };
    const at::ScalarType st = mean_of(0).scalar_type();
    at::Tensor w = weight.defined() ? weight : at::ones({c}, mean_of(0).options());

    // Per view, eval-mode batch-norm backward, asked for the parameter gradients only, is the
    // local per-channel sum(dy * xhat) and sum(dy): this rank's share of the weight and bias
    // gradients. One all-reduce sums every view's.
    std::vector<at::Tensor> dys, local;
    for (size_t v = 0; v < k; ++v) {
      const at::Tensor& input = saved[v];
      const at::Tensor& gy = grad_outputs[v];
      at::Tensor dy = gy.defined() ? gy.contiguous(input.suggest_memory_format()) : at::zeros_like(input);
      auto local_grads = at::native_batch_norm_backward(
          dy, input, w, mean_of(v), var_of(v), std::nullopt, std::nullopt, /*train=*/false, eps, {false, true, true});
      local.push_back(std::get<2>(local_grads)); // sum(dy)
      local.push_back(std::get<1>(local_grads)); // sum(dy * xhat)
      dys.push_back(std::move(dy));
    }
    at::Tensor global = at::cat(local);
    allreduce_inplace(*group, global);

    torch::autograd::variable_list grads;
    at::Tensor grad_weight;
    at::Tensor grad_bias;
    for (size_t v = 0; v < k; ++v) {
      const at::Tensor& input = saved[v];
      const at::Tensor& mean = mean_of(v);
      const at::Tensor& var = var_of(v);
      const int64_t dim = input.dim();
      const double n_total = n_totals[v];
      at::Tensor sum_dy = global.narrow(0, static_cast<int64_t>(2 * v) * c, c);
      at::Tensor sum_dy_xhat = global.narrow(0, static_cast<int64_t>(2 * v + 1) * c, c);
      // dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the global batch:
      // per channel, a * dy + b * (x - mean) + d, computed in the statistics' type.
      at::Tensor invstd = (var + eps).rsqrt();
      at::Tensor a = w * invstd;
      at::Tensor b = -a * invstd * sum_dy_xhat / n_total;
      at::Tensor d = -a * sum_dy / n_total;
      at::Tensor grad_input = fused_grad_input(dys[v], input, mean, a, b, d);
      if (!grad_input.defined()) {
        at::Tensor xmu = input.scalar_type() == st ? input - stat_shape_view(mean, dim)
                                                   : input.to(st).sub_(stat_shape_view(mean, dim));
        at::Tensor gx = at::addcmul(stat_shape_view(d, dim), dys[v].to(st), stat_shape_view(a, dim));
        gx.addcmul_(xmu, stat_shape_view(b, dim));
        grad_input = gx.to(input.scalar_type());
      }
      grads.push_back(grad_input);
      // This rank's shares, per view in the parameters' type, summed over the views as autograd
      // sums the gradients of separate calls.
      if (weight.defined()) {
        at::Tensor gw = local[2 * v + 1].to(weight.scalar_type());
        grad_weight = grad_weight.defined() ? grad_weight + gw : gw;
      }
      if (has_bias) {
        at::Tensor gb = local[2 * v].to(weight.defined() ? weight.scalar_type() : st);
        grad_bias = grad_bias.defined() ? grad_bias + gb : gb;
      }
    }
    // One gradient per forward argument: each view, weight, bias (non-tensor arguments get
    // undefined ones).
    grads.push_back(grad_weight);
    grads.push_back(grad_bias);
    for (int i = 0; i < 4; ++i) {
      grads.push_back(at::Tensor());
    }
    return grads;
  }
};

// Ranks other than 0 announce themselves under the attempt's prefix; rank 0 waits until all have
// (what TCPStore's waitWorkers did, counted where only holders of the secret write). A timeout
// says how many arrived; libtorch's own message would name the keys, and with them the secret.
void wait_for_ranks(c10d::Store& store, int rank, int world, std::chrono::milliseconds timeout) {
  auto key = [](int r) { return "joined/" + std::to_string(r); };
  if (rank != 0) {
    store.set(key(rank), std::vector<uint8_t>{1});
    return;
  }
  std::vector<std::string> keys;
  for (int r = 1; r < world; ++r) {
    keys.push_back(key(r));
  }
  if (keys.empty()) {
    return;
  }
  try {
    store.wait(keys, timeout);
  } catch (const c10::DistStoreError&) {
    int joined = 1;
    for (const auto& k : keys) {
      joined += store.check({k}) ? 1 : 0;
    }
    TORCH_CHECK(
        false, "timed out after ", timeout.count(), " ms waiting for the other ranks: ", joined, " of ", world,
        " joined with this attempt's store prefix");
  }
}

} // namespace

extern "C" {

typedef struct bt_pg bt_pg;

void bt_dist_free_error(char* err) {
  std::free(err);
}

// Joins a process group. backend: 0 = Gloo, 1 = NCCL (device_index is the CUDA device).
// Rank 0 hosts the TCPStore on master_port, on the listening socket master_listen_fd when it is
// not -1 (the store takes that descriptor over); all ranks wait up to timeout_ms for the others.
char* bt_pg_new(
    int backend,
    const char* master_addr,
    uint16_t master_port,
    const char* local_addr,
    int rank,
    int world_size,
    int64_t timeout_ms,
    int device_index,
    int master_listen_fd,
    const char* store_prefix,
    bt_pg** out) {
  *out = nullptr;
  return bt_guarded([&] {
    // The prefix is the attempt's secret: no message here names it.
    const std::string secret = store_prefix == nullptr ? std::string() : std::string(store_prefix);
    TORCH_CHECK(!secret.empty(), "the store prefix must not be empty");
    TORCH_CHECK(world_size >= 1, "world size must be at least 1, got ", world_size);
    TORCH_CHECK(rank >= 0 && rank < world_size, "rank ", rank, " is outside a world of ", world_size);
    TORCH_CHECK(timeout_ms > 0, "timeout must be positive");
    auto g = c10::make_intrusive<Group>();
    g->rank = rank;
    g->world = world_size;
    g->timeout = std::chrono::milliseconds(timeout_ms);

    c10d::TCPStoreOptions so;
    so.port = master_port;
    so.isServer = rank == 0;
    so.numWorkers = static_cast<size_t>(world_size);
    // TCPStore's own count of arrivals (waitWorkers) is the unprefixed key "init/", which every
    // client that connects bumps: a stray peer without the secret would count as a rank. The
    // ranks count themselves under the secret instead (wait_for_ranks).
    so.waitWorkers = false;
    so.timeout = g->timeout;
    if (rank == 0 && master_listen_fd >= 0) {
      so.masterListenFd = master_listen_fd;
    }
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), so);
    g->store = tcp;
    // Every key of this attempt lives under bt/<secret>/: a peer that connects to the store
    // without the secret (a stale rank of an earlier attempt on the same port, a stray client)
    // meets nobody and times out. This is not authentication: libtorch's TCPStore has none, and
    // any client that reaches the port can list every key (Store::listKeys, the LIST_KEYS query)
    // and so learn the prefix, or bump, overwrite and delete keys. The secret keeps honest
    // strays out; keeping hostile ones off the port is the network policy's job.
    auto attempt = c10::make_intrusive<c10d::PrefixStore>("bt/" + secret, tcp);
    wait_for_ranks(*attempt, rank, world_size, g->timeout);
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("pg0", attempt);

    if (backend == 0) {
      auto opts = c10d::ProcessGroupGloo::Options::create(g->timeout);
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(local_addr)));
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world_size, opts);
    } else if (backend == 1) {
#ifdef USE_C10D_NCCL
      g->nccl = true;
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = g->timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world_size, opts);
#else
      (void)device_index;
      TORCH_CHECK(false, "this build has no NCCL support (build bt-worker with --features nccl)");
#endif
    } else {
      TORCH_CHECK(false, "unknown backend code ", backend);
    }
    auto* h = new Handle{g};
    *out = reinterpret_cast<bt_pg*>(h);
  });
}

void bt_pg_free(bt_pg* pg) {
  try {
    delete reinterpret_cast<Handle*>(pg);
  } catch (...) {
    // A destructor that throws (a backend shutting down badly) must not cross into Rust.
  }
}

char* bt_pg_all_reduce_sum(bt_pg* pg, at::Tensor* t) {
  return bt_guarded([&] { allreduce_inplace(*reinterpret_cast<Handle*>(pg)->g, *t); });
}

char* bt_pg_broadcast(bt_pg* pg, at::Tensor* t, int root) {
  return bt_guarded([&] { broadcast_inplace(*reinterpret_cast<Handle*>(pg)->g, *t, root); });
}

char* bt_pg_all_gather(bt_pg* pg, at::Tensor* t, at::Tensor** out) {
  *out = nullptr;
  return bt_guarded([&] {
    at::Tensor r = allgather(*reinterpret_cast<Handle*>(pg)->g, *t);
    *out = new at::Tensor(std::move(r));
  });
}

char* bt_pg_all_gather_into(bt_pg* pg, at::Tensor* t, at::Tensor* out) {
  return bt_guarded([&] { allgather_into(*reinterpret_cast<Handle*>(pg)->g, *t, *out); });
}

typedef struct bt_grad_buckets bt_grad_buckets;

using BucketsHandle = std::shared_ptr<GradBuckets>;

// Aliases the grads of `params` into persistent flat buckets of about bucket_bytes; with overlap
// the buckets' all-reduces start during backward (after bt_grad_buckets_arm).
char* bt_grad_buckets_new(
    bt_pg* pg, at::Tensor** params, int64_t n, int64_t bucket_bytes, int overlap, bt_grad_buckets** out) {
  *out = nullptr;
  return bt_guarded([&] {
    TORCH_CHECK(bucket_bytes > 0, "bucket size must be positive");
    std::vector<at::Tensor> ps;
    ps.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      ps.push_back(*params[i]);
    }
    auto b = grad_buckets_new(reinterpret_cast<Handle*>(pg)->g, std::move(ps), bucket_bytes);
    grad_buckets_set_overlap(b, overlap != 0);
    *out = reinterpret_cast<bt_grad_buckets*>(new BucketsHandle(std::move(b)));
  });
}

char* bt_grad_buckets_set_overlap(bt_grad_buckets* b, int overlap) {
  return bt_guarded([&] { grad_buckets_set_overlap(*reinterpret_cast<BucketsHandle*>(b), overlap != 0); });
}

// The next backward is the step's: its hooks start the buckets' all-reduces (with overlap on).
char* bt_grad_buckets_arm(bt_grad_buckets* b) {
  return bt_guarded([&] { grad_buckets_arm(**reinterpret_cast<BucketsHandle*>(b)); });
}

// Sums the bucketed gradients over ranks, in place: starts the buckets the hooks did not, waits
// for all.
char* bt_grad_buckets_allreduce(bt_grad_buckets* b) {
  return bt_guarded([&] { grad_buckets_allreduce(**reinterpret_cast<BucketsHandle*>(b)); });
}

int64_t bt_grad_buckets_count(bt_grad_buckets* b) {
  return static_cast<int64_t>((*reinterpret_cast<BucketsHandle*>(b))->buckets.size());
}

// Buckets whose all-reduce has started in this step and not been waited for yet.
int64_t bt_grad_buckets_started(bt_grad_buckets* b) {
  GradBuckets& gb = **reinterpret_cast<BucketsHandle*>(b);
  std::lock_guard<std::mutex> lock(gb.mu);
  return static_cast<int64_t>(gb.next);
}

void bt_grad_buckets_free(bt_grad_buckets* b) {
  try {
    auto* h = reinterpret_cast<BucketsHandle*>(b);
    grad_buckets_remove_hooks(*h);
    delete h;
  } catch (...) {
  }
}

char* bt_pg_barrier(bt_pg* pg) {
  return bt_guarded([&] {
    Group& g = *reinterpret_cast<Handle*>(pg)->g;
    std::lock_guard<std::mutex> lock(g.mu);
    wait_work(g, g.backend->barrier(c10d::BarrierOptions()));
  });
}

// Sums the gradients of `params` over ranks in flat buckets. A parameter without a gradient gets
// a zero one first, so every rank packs the same layout.
char* bt_pg_allreduce_grads(bt_pg* pg, at::Tensor** params, int64_t n, int64_t bucket_bytes) {
  return bt_guarded([&] {
    Group& g = *reinterpret_cast<Handle*>(pg)->g;
    std::vector<at::Tensor> grads;
    grads.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      at::Tensor& p = *params[i];
      if (!p.grad().defined()) {
        at::NoGradGuard ng;
        p.mutable_grad() = at::zeros_like(p, at::MemoryFormat::Contiguous);
      }
      grads.push_back(p.grad());
    }
    bucketed(g, grads, bucket_bytes, [&](at::Tensor& buf) { allreduce_inplace(g, buf); });
  });
}

// Broadcasts `tensors` (parameters, buffers) in place from `root`, in flat buckets.
char* bt_pg_broadcast_tensors(bt_pg* pg, at::Tensor** tensors, int64_t n, int root, int64_t bucket_bytes) {
  return bt_guarded([&] {
    Group& g = *reinterpret_cast<Handle*>(pg)->g;
    std::vector<at::Tensor> ts;
    ts.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      ts.push_back(*tensors[i]);
    }
    bucketed(g, ts, bucket_bytes, [&](at::Tensor& buf) { broadcast_inplace(g, buf, root); });
  });
}

char* bt_sync_batch_norm(
    bt_pg* pg,
    at::Tensor** inputs,
    int64_t n,
    at::Tensor* weight,
    at::Tensor* bias,
    at::Tensor* running_mean,
    at::Tensor* running_var,
    double momentum,
    double eps,
    at::Tensor** outs) {
  for (int64_t v = 0; v < n; ++v) {
    outs[v] = nullptr;
  }
  return bt_guarded([&] {
    auto group = reinterpret_cast<Handle*>(pg)->g;
    std::vector<at::Tensor> xs;
    for (int64_t v = 0; v < n; ++v) {
      check_device(*group, *inputs[v], "sync_batch_norm");
      xs.push_back(*inputs[v]);
    }
    std::optional<at::Tensor> w;
    if (weight != nullptr && weight->defined()) {
      w = *weight;
    }
    std::optional<at::Tensor> b;
    if (bias != nullptr && bias->defined()) {
      b = *bias;
    }
    RunningStats running{
        running_mean != nullptr ? *running_mean : at::Tensor(),
        running_var != nullptr ? *running_var : at::Tensor()};
    // TensorList, not the vector itself: autograd counts each element as an input of the node.
    auto r = SyncBatchNormFn::apply(at::TensorList(xs), w, b, group, running, momentum, eps);
    TORCH_CHECK(static_cast<int64_t>(r.size()) == n, "sync_batch_norm: ", r.size(), " outputs for ", n, " inputs");
    for (int64_t v = 0; v < n; ++v) {
      outs[v] = new at::Tensor(std::move(r[v]));
    }
  });
}

} // extern "C"
