// Paged attention on CPU that reads the KV cache in place (no gather of the
// live context into a dense, padded tensor).
//
// One call per layer covers every token of a step: decode tokens (one per
// sequence) and multi-token prefill chunks alike. Token t attends to
// positions 0 .. ctx[t]-1 of sequence seq[t], whose position p lives in cache
// slot tables[seq[t]][p / block_size] * block_size + p % block_size.
//
// Layer cache layout (runner/model.py): [2, kv_heads, num_slots, head_dim],
// K then V, heads outermost, one contiguous head_dim row per slot.
//
// Work item = (query tile, kv head): the `group` query heads that share a kv
// head, of up to kTile consecutive tokens of a prefill chunk (one for decode),
// are scored against each key row while it is in L1 (GQA reads K/V once per
// group and tile). Items are handed out dynamically (an atomic counter) to the
// at::parallel_for threads, so ragged context lengths balance. Dot products
// and the V accumulation are written as fixed-width lane loops that the
// compiler vectorizes without reassociating a scalar reduction (no
// -ffast-math needed).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>  // the at::Tensor <-> torch.Tensor caster (lighter than torch/extension.h)

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "vec.h"

namespace {

using namespace fleetserve_vec;

// Row operations over head_dim = NJ x 16 values (NJ > 0: unrolled, accumulators in registers),
// or any head_dim (NJ == 0).
template <int NJ>
struct Rows {
  // a . b
  static inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
    if constexpr (NJ > 0) {
      vfloat acc[2] = {vload(a) * vload(b), {}};
      for (int j = 1; j < NJ; ++j) acc[j & 1] += vload(a + j * kLanes) * vload(b + j * kLanes);
      return hsum(acc[0] + acc[1]);
    } else {
      vfloat acc = {};
      int64_t d = 0;
      for (; d + kLanes <= n; d += kLanes) acc += vload(a + d) * vload(b + d);
      float s = hsum(acc);
      for (; d < n; ++d) s += a[d] * b[d];
      return s;
    }
  }

  // acc += sum_r p[r] * rows[r], rows of n values with stride n: the accumulator stays in
  // registers across the rows (one load and store per block, not per row)
  static inline void accumulate(float* __restrict__ acc, const float* __restrict__ p,
                                const float* __restrict__ rows, int64_t count, int64_t n) {
    if constexpr (NJ > 0) {
      vfloat a[NJ];
      for (int j = 0; j < NJ; ++j) a[j] = vload(acc + j * kLanes);
      for (int64_t r = 0; r < count; ++r) {
        const float w = p[r];
        const float* row = rows + r * n;
        for (int j = 0; j < NJ; ++j) a[j] += w * vload(row + j * kLanes);
      }
      for (int j = 0; j < NJ; ++j) *reinterpret_cast<vfloat*>(acc + j * kLanes) = a[j];
    } else {
      for (int64_t r = 0; r < count; ++r) {
        const float w = p[r];
        const float* row = rows + r * n;
        int64_t d = 0;
        for (; d + kLanes <= n; d += kLanes) {
          *reinterpret_cast<vfloat*>(acc + d) += w * vload(row + d);
        }
        for (; d < n; ++d) acc[d] += w * row[d];
      }
    }
  }
};

// Query tiles: up to kTile consecutive tokens of one prefill chunk (same sequence, positions
// p, p+1, ...) are scored against each key row together, so a chunk of n tokens reads its
// context's K/V n / kTile times instead of n times. A decode token is a tile of one.
constexpr int64_t kTile = 16;

template <typename scalar_t, int NJ>
void run(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
         const at::Tensor& seq, const at::Tensor& ctx, int64_t block_size, double scale) {
  using R = Rows<NJ>;
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = cache.size(1), num_slots = cache.size(2);
  const int64_t group = num_heads / kv_heads;
  const int64_t width = tables.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = cache.data_ptr<scalar_t>();
  const scalar_t* vp = kp + kv_heads * num_slots * head_dim;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* sp = seq.data_ptr<int32_t>();
  const int32_t* cp = ctx.data_ptr<int32_t>();
  const float fscale = static_cast<float>(scale);
  constexpr bool is_float = std::is_same<scalar_t, float>::value;

  std::vector<std::pair<int64_t, int64_t>> tiles;  // (first token, tokens)
  for (int64_t t = 0; t < num_tokens;) {
    int64_t n = 1;
    while (t + n < num_tokens && n < kTile && sp[t + n] == sp[t] && cp[t + n] == cp[t + n - 1] + 1) ++n;
    tiles.emplace_back(t, n);
    t += n;
  }
  const int64_t items = static_cast<int64_t>(tiles.size()) * kv_heads;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t max_rows = kTile * group;
    std::vector<float> scores, qf(max_rows * head_dim), acc(max_rows * head_dim), best(max_rows),
        total(max_rows), converted;
    if (!is_float) converted.resize(block_size * head_dim);
    // one block's rows (block_size x head_dim) as float32: in place for a float cache
    auto block_rows = [&](const scalar_t* base, int64_t rows) -> const float* {
      if constexpr (is_float) {
        return reinterpret_cast<const float*>(base);
      } else {
        for (int64_t e = 0; e < rows * head_dim; ++e) converted[e] = static_cast<float>(base[e]);
        return converted.data();
      }
    };
    for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) {
      const auto [t0, count] = tiles[item / kv_heads];
      const int64_t h = item % kv_heads;
      const int64_t first_ctx = cp[t0];               // token t0 + i attends to first_ctx + i positions
      const int64_t n = first_ctx + count - 1;        // the tile's longest context
      const int64_t rows_used = count * group;        // score row (i, g) = i * group + g
      const int32_t* table = tp + static_cast<int64_t>(sp[t0]) * width;
      for (int64_t i = 0; i < count; ++i) {
        const scalar_t* qrow = qp + ((t0 + i) * num_heads + h * group) * head_dim;
        for (int64_t e = 0; e < group * head_dim; ++e) qf[i * group * head_dim + e] = static_cast<float>(qrow[e]) * fscale;
      }
      scores.resize(static_cast<size_t>(rows_used * n));
      std::fill(best.begin(), best.begin() + rows_used, -std::numeric_limits<float>::infinity());
      const scalar_t* khead = kp + h * num_slots * head_dim;
      const scalar_t* vhead = vp + h * num_slots * head_dim;
      // pass 1: scores of every position, block by block through the table; position p is seen
      // by the tile's tokens i with p < first_ctx + i (causal)
      for (int64_t start = 0; start < n; start += block_size) {
        const int64_t rows = std::min(block_size, n - start);
        const float* kblock = block_rows(khead + static_cast<int64_t>(table[start / block_size]) * block_size * head_dim, rows);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t p = start + r;
          const float* krow = kblock + r * head_dim;
          for (int64_t row = std::max<int64_t>(0, p - first_ctx + 1) * group; row < rows_used; ++row) {
            const float s = R::dot(qf.data() + row * head_dim, krow, head_dim);
            scores[row * n + p] = s;
            best[row] = std::max(best[row], s);
          }
        }
      }
      // softmax numerators (fp32) and their sums, over each row's own context
      for (int64_t row = 0; row < rows_used; ++row) {
        const int64_t len = first_ctx + row / group;
        float* sr = scores.data() + row * n;
        float sum = 0.f;
        for (int64_t e = 0; e < len; ++e) {
          sr[e] = std::exp(sr[e] - best[row]);
          sum += sr[e];
        }
        total[row] = sum;
      }
      // pass 2: probability-weighted sum of the value rows, a block at a time per score row
      std::fill(acc.begin(), acc.begin() + rows_used * head_dim, 0.f);
      for (int64_t start = 0; start < n; start += block_size) {
        const int64_t rows = std::min(block_size, n - start);
        const float* vblock = block_rows(vhead + static_cast<int64_t>(table[start / block_size]) * block_size * head_dim, rows);
        for (int64_t row = std::max<int64_t>(0, start - first_ctx + 1) * group; row < rows_used; ++row) {
          const int64_t visible = std::min(rows, first_ctx + row / group - start);  // causal
          R::accumulate(acc.data() + row * head_dim, scores.data() + row * n + start, vblock, visible, head_dim);
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        scalar_t* orow = op + ((t0 + i) * num_heads + h * group) * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t row = i * group + g;
          const float inv = total[row] > 0.f ? 1.f / total[row] : 0.f;
          for (int64_t d = 0; d < head_dim; ++d) {
            orow[g * head_dim + d] = static_cast<scalar_t>(acc[row * head_dim + d] * inv);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void dispatch_head_dim(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                       const at::Tensor& seq, const at::Tensor& ctx, int64_t block_size, double scale) {
  switch (q.size(2)) {
    case 32: return run<scalar_t, 2>(out, q, cache, tables, seq, ctx, block_size, scale);
    case 64: return run<scalar_t, 4>(out, q, cache, tables, seq, ctx, block_size, scale);
    case 96: return run<scalar_t, 6>(out, q, cache, tables, seq, ctx, block_size, scale);
    case 128: return run<scalar_t, 8>(out, q, cache, tables, seq, ctx, block_size, scale);
    default: return run<scalar_t, 0>(out, q, cache, tables, seq, ctx, block_size, scale);
  }
}

}  // namespace

// out [T, H, D] (written), q [T, H, D], cache [2, KV, slots, D], tables [S, W] int32,
// seq [T] int32 (row of tables), ctx [T] int32 (positions attended, >= 1).
void paged_attention(at::Tensor out, at::Tensor q, at::Tensor cache, at::Tensor tables,
                     at::Tensor seq, at::Tensor ctx, int64_t block_size, double scale) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "paged_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "paged_attention: q and out must be [T, H, D]");
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == 2 && cache.size(3) == q.size(2),
              "paged_attention: cache must be [2, KV, slots, D]");
  TORCH_CHECK(q.size(1) % cache.size(1) == 0, "paged_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && cache.is_contiguous() && tables.is_contiguous(),
              "paged_attention: contiguous tensors only");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "paged_attention: q, out and cache must share a dtype");
  TORCH_CHECK(tables.scalar_type() == at::kInt && seq.scalar_type() == at::kInt &&
                  ctx.scalar_type() == at::kInt,
              "paged_attention: tables, seq and ctx must be int32");
  TORCH_CHECK(seq.numel() == q.size(0) && ctx.numel() == q.size(0), "paged_attention: one seq/ctx per token");
  TORCH_CHECK(block_size >= 1, "paged_attention: block_size must be >= 1");
  {  // every address the kernel forms stays inside the cache and the tables
    const int64_t rows = tables.size(0), width = tables.size(1), blocks = cache.size(2) / block_size;
    const int32_t* sp = seq.data_ptr<int32_t>();
    const int32_t* cp = ctx.data_ptr<int32_t>();
    for (int64_t t = 0; t < seq.numel(); ++t) {
      TORCH_CHECK(sp[t] >= 0 && sp[t] < rows, "paged_attention: token ", t, " names table row ", sp[t]);
      TORCH_CHECK(cp[t] >= 1 && cp[t] <= width * block_size, "paged_attention: token ", t, " context ", cp[t],
                  " outside [1, ", width * block_size, "]");
    }
    const int32_t* tp = tables.data_ptr<int32_t>();
    for (int64_t i = 0; i < tables.numel(); ++i) {
      TORCH_CHECK(tp[i] >= 0 && tp[i] < blocks, "paged_attention: block ", tp[i], " outside [0, ", blocks, ")");
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    dispatch_head_dim<scalar_t>(out, q, cache, tables, seq, ctx, block_size, scale);
  });
}

// csrc/fused_ops.cpp, compiled into the same module
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& w, double eps);
void silu_mul(at::Tensor out, const at::Tensor& gate_up);
void rope_write_kv(at::Tensor q_out, at::Tensor cache_rows, const at::Tensor& qkv, const at::Tensor& cos,
                   const at::Tensor& sin, const at::Tensor& positions, const at::Tensor& slots, int64_t nh,
                   int64_t nkv, int64_t num_slots);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "Paged attention over a block-table KV cache (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm of float32 rows into out (CPU)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [tokens, 2 * intermediate] row into out (CPU)");
  m.def("rope_write_kv", &rope_write_kv,
        "Rotary embedding of q (into q_out) and k, and the step's K/V written to their cache slots (CPU)");
}
