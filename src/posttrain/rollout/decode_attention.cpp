// Decode attention for posttrain's rollout engine (posttrain/rollout/decode_attention.py): one query per row against its
// prompt's cached keys and values (shared by the prompt's n rows) and its own new tokens' ones, fp32, on the CPU.
//
//   scores = decode_scores(q, prompt_keys, prompt_lengths, new_keys, count, n)      [rows, heads, width + count]
//   out = decode_mix(softmax(scores), prompt_values, prompt_lengths, new_values, count, n)      [rows, heads, D]
//
// q [rows, heads, D] (scaled), prompt caches [prompts, kv, width, D] with a prompt's keys in its last `length` slots
// (its left padding scores -inf and is never read), new-token caches [rows, kv, slots, D] of which the first `count`
// slots are read; rows = prompts * n, heads a multiple of kv (grouped-query attention). Each query's products with a
// key or value row are summed in vector registers, and a thread's task is one prompt and key/value head: that head's
// prompt cache comes from memory once and from cache for the prompt's n rows and the heads that share it. torch's
// batched one-row products pay a cost per batch entry and pass their one-row scores through copies.
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// The sum of a vector's 16 lanes, as a tree (halves added, then quarters): a serial sum of 16 scalars kept a first
// version of the kernel no faster than torch's products. memcpy of the halves rather than __builtin_shufflevector,
// which GCC has only from version 12.
inline float hsum(v16 a) {
  v8 low, high;
  std::memcpy(&low, &a, sizeof(low));
  std::memcpy(&high, reinterpret_cast<const char*>(&a) + sizeof(low), sizeof(high));
  const v8 b = low + high;
  v4 quarter, other;
  std::memcpy(&quarter, &b, sizeof(quarter));
  std::memcpy(&other, reinterpret_cast<const char*>(&b) + sizeof(quarter), sizeof(other));
  const v4 c = quarter + other;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// The threads' tasks are the (prompt, key/value head) pairs: a task reads that head's prompt cache for each of the
// prompt's n rows and each query head that shares the key/value head, `visit(task, row, head, kv_head, start)` with
// `start` the prompt's first real slot (its left padding is never read).
template <typename Visit>
void for_each_query(int64_t m, int64_t kv, int64_t n, int64_t per_kv, int64_t width, const int64_t* lengths,
                    const Visit& visit) {
  at::parallel_for(0, m * kv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / kv, g = task % kv, start = width - lengths[p];
      for (int64_t i = 0; i < n; ++i)
        for (int64_t hh = 0; hh < per_kv; ++hh) visit(task, p * n + i, g * per_kv + hh, g, start);
    }
  });
}

template <int64_t C>  // C = D / 16 vectors per row
void scores_impl(const float* queries, const float* prompt_keys, const int64_t* lengths, const float* new_keys,
                 float* scores, int64_t m, int64_t kv, int64_t width, int64_t slots, int64_t heads, int64_t n,
                 int64_t count) {
  constexpr int64_t d = C * 16;
  const int64_t cols = width + count;
  const float ninf = -std::numeric_limits<float>::infinity();
  for_each_query(m, kv, n, heads / kv, width, lengths, [&](int64_t task, int64_t r, int64_t h, int64_t g,
                                                           int64_t start) {
    const float* keys = prompt_keys + task * width * d;
    const float* own_keys = new_keys + (r * kv + g) * slots * d;
    v16 q[C];
    for (int64_t c = 0; c < C; ++c) q[c] = load(queries + (r * heads + h) * d + 16 * c);
    float* s = scores + (r * heads + h) * cols;
    for (int64_t j = 0; j < start; ++j) s[j] = ninf;
    for (int64_t j = start; j < width; ++j) {
      const float* k = keys + j * d;
      v16 acc = q[0] * load(k);
      for (int64_t c = 1; c < C; ++c) acc += q[c] * load(k + 16 * c);
      s[j] = hsum(acc);
    }
    for (int64_t j = 0; j < count; ++j) {
      const float* k = own_keys + j * d;
      v16 acc = q[0] * load(k);
      for (int64_t c = 1; c < C; ++c) acc += q[c] * load(k + 16 * c);
      s[width + j] = hsum(acc);
    }
  });
}

template <int64_t C>
void mix_impl(const float* probs, const float* prompt_values, const int64_t* lengths, const float* new_values,
              float* out, int64_t m, int64_t kv, int64_t width, int64_t slots, int64_t heads, int64_t n, int64_t count) {
  constexpr int64_t d = C * 16;
  const int64_t cols = width + count;
  for_each_query(m, kv, n, heads / kv, width, lengths, [&](int64_t task, int64_t r, int64_t h, int64_t g,
                                                           int64_t start) {
    const float* values = prompt_values + task * width * d;
    const float* own_values = new_values + (r * kv + g) * slots * d;
    const float* w = probs + (r * heads + h) * cols;
    v16 acc[C] = {};
    for (int64_t j = start; j < width; ++j) {
      const float* v = values + j * d;
      for (int64_t c = 0; c < C; ++c) acc[c] += w[j] * load(v + 16 * c);
    }
    for (int64_t j = 0; j < count; ++j) {
      const float* v = own_values + j * d;
      for (int64_t c = 0; c < C; ++c) acc[c] += w[width + j] * load(v + 16 * c);
    }
    for (int64_t c = 0; c < C; ++c) store(out + (r * heads + h) * d + 16 * c, acc[c]);
  });
}

void check_operand(const at::Tensor& t, int64_t rank) {
  TORCH_CHECK(t.dim() == rank && t.is_contiguous() && t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "decode attention: contiguous fp32 CPU tensors of rank ", rank);
}

// The shapes both kernels read by: `rows` x `heads` queries of `d` (q's, or the output's), the prompt and new-token
// caches, the prompts' lengths.
void check(int64_t rows, int64_t heads, int64_t d, const at::Tensor& prompt, const at::Tensor& lengths,
           const at::Tensor& fresh, int64_t count, int64_t n) {
  check_operand(prompt, 4);
  check_operand(fresh, 4);
  TORCH_CHECK(lengths.dim() == 1 && lengths.is_contiguous() && lengths.scalar_type() == at::kLong &&
                  lengths.device().is_cpu(), "decode attention: int64 prompt lengths");
  const int64_t m = prompt.size(0), kv = prompt.size(1);
  TORCH_CHECK(n >= 1 && m * n == rows && fresh.size(0) == rows && lengths.size(0) == m, "decode attention: rows");
  TORCH_CHECK(kv >= 1 && heads % kv == 0 && fresh.size(1) == kv, "decode attention: heads");
  TORCH_CHECK(prompt.size(3) == d && fresh.size(3) == d && d % 16 == 0 && d >= 16 && d <= 256,
              "decode attention: head_dim a multiple of 16, at most 256");
  TORCH_CHECK(count >= 0 && count <= fresh.size(2), "decode attention: count");
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t p = 0; p < m; ++p)
    TORCH_CHECK(length[p] >= 0 && length[p] <= prompt.size(2), "decode attention: prompt lengths");
}

// The kernels with their vector count per row as a constant (head_dim / 16: 1 to 16).
template <template <int64_t> class Kernel, typename... Args>
void dispatch(int64_t vectors, Args... args) {
  switch (vectors) {
#define POSTTRAIN_CASE(C) case C: Kernel<C>::run(args...); break;
    POSTTRAIN_CASE(1) POSTTRAIN_CASE(2) POSTTRAIN_CASE(3) POSTTRAIN_CASE(4) POSTTRAIN_CASE(5) POSTTRAIN_CASE(6)
    POSTTRAIN_CASE(7) POSTTRAIN_CASE(8) POSTTRAIN_CASE(9) POSTTRAIN_CASE(10) POSTTRAIN_CASE(11) POSTTRAIN_CASE(12)
    POSTTRAIN_CASE(13) POSTTRAIN_CASE(14) POSTTRAIN_CASE(15) POSTTRAIN_CASE(16)
#undef POSTTRAIN_CASE
    default: TORCH_CHECK(false, "decode attention: head_dim");
  }
}

template <int64_t C> struct Scores { template <typename... A> static void run(A... a) { scores_impl<C>(a...); } };
template <int64_t C> struct Mix { template <typename... A> static void run(A... a) { mix_impl<C>(a...); } };

at::Tensor decode_scores(const at::Tensor& q, const at::Tensor& prompt_keys, const at::Tensor& lengths,
                         const at::Tensor& new_keys, int64_t count, int64_t n) {
  check_operand(q, 3);
  check(q.size(0), q.size(1), q.size(2), prompt_keys, lengths, new_keys, count, n);
  const int64_t heads = q.size(1), width = prompt_keys.size(2);
  at::Tensor scores = at::empty({q.size(0), heads, width + count}, q.options());
  dispatch<Scores>(q.size(2) / 16, q.data_ptr<float>(), prompt_keys.data_ptr<float>(), lengths.data_ptr<int64_t>(),
                   new_keys.data_ptr<float>(), scores.data_ptr<float>(), prompt_keys.size(0), prompt_keys.size(1),
                   width, new_keys.size(2), heads, n, count);
  return scores;
}

at::Tensor decode_mix(const at::Tensor& probs, const at::Tensor& prompt_values, const at::Tensor& lengths,
                      const at::Tensor& new_values, int64_t count, int64_t n) {
  check_operand(probs, 3);
  check_operand(prompt_values, 4);
  const int64_t rows = probs.size(0), heads = probs.size(1), d = prompt_values.size(3), width = prompt_values.size(2);
  TORCH_CHECK(probs.size(2) == width + count, "decode attention: probabilities' width");
  check(rows, heads, d, prompt_values, lengths, new_values, count, n);
  at::Tensor out = at::empty({rows, heads, d}, probs.options());
  dispatch<Mix>(d / 16, probs.data_ptr<float>(), prompt_values.data_ptr<float>(), lengths.data_ptr<int64_t>(),
                new_values.data_ptr<float>(), out.data_ptr<float>(), prompt_values.size(0), prompt_values.size(1),
                width, new_values.size(2), heads, n, count);
  return out;
}

}  // namespace

TORCH_LIBRARY(posttrain_decode, lib) {
  lib.def("decode_scores(Tensor q, Tensor prompt_keys, Tensor lengths, Tensor new_keys, int count, int n) -> Tensor");
  lib.def("decode_mix(Tensor probs, Tensor prompt_values, Tensor lengths, Tensor new_values, int count, int n) -> "
          "Tensor");
}
TORCH_LIBRARY_IMPL(posttrain_decode, CPU, lib) {
  lib.impl("decode_scores", &decode_scores);
  lib.impl("decode_mix", &decode_mix);
}
