#include "vec.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <cmath>
#include <tuple>
#include <vector>
#include "common.h"

using dynvec::Vec;

// Activation codes follow reference.ACTIVATIONS.
static inline float act(float v, int64_t kind) {
  switch (kind) {
    case 0: return v > 0.0f ? v : 0.0f;
    case 1: return 0.5f * v * (1.0f + std::erf(v * 0.7071067811865476f));
    case 2: return 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case 3: return v / (1.0f + std::exp(-v));
    case 4: return 1.0f / (1.0f + std::exp(-v));
    case 5: return std::tanh(v);
    default: return v;
  }
}

// y[n, out] = b_down + sum over selected (token, expert) of h(token, slice) @ w_down_t[slice].
// Each hidden unit's up row and down row are read once for all the tokens that
// selected its expert (fused: no hidden buffer). Returns (y, pairs, units).
std::tuple<torch::Tensor, int64_t, int64_t> expert_ffn_fwd(
    torch::Tensor x, torch::Tensor w_up, torch::Tensor b_up, torch::Tensor w_gate,
    torch::Tensor b_gate, torch::Tensor w_down_t, torch::Tensor b_down, torch::Tensor mask,
    int64_t kind) {
  TORCH_CHECK(x.dim() == 2 && w_up.is_contiguous() && w_down_t.is_contiguous());
  // data_ptr<float>() below also checks every dtype; these are no-ops when contiguous.
  x = x.contiguous();
  b_up = b_up.contiguous(); b_gate = b_gate.contiguous(); b_down = b_down.contiguous();
  mask = mask.to(at::kBool).contiguous();
  const int64_t n = x.size(0), d = x.size(1), hidden = w_up.size(0), out = w_down_t.size(1);
  const int64_t n_exp = mask.size(1);
  const bool glu = w_gate.numel() > 0;
  TORCH_CHECK(!glu || w_gate.is_contiguous());
  const float* xp = x.data_ptr<float>();
  const float* up = w_up.data_ptr<float>();
  const float* gp = glu ? w_gate.data_ptr<float>() : nullptr;
  const float* dp = w_down_t.data_ptr<float>();
  const float* bup = b_up.numel() ? b_up.data_ptr<float>() : nullptr;
  const float* bgp = b_gate.numel() ? b_gate.data_ptr<float>() : nullptr;
  const bool* mp = mask.data_ptr<bool>();
  // Token lists per selected expert (CSR), skipping experts nobody picks.
  std::vector<int64_t> experts, start{0}, toks;
  int64_t units = 0;
  for (int64_t e = 0; e < n_exp; ++e) {
    const int64_t lo = e * hidden / n_exp, hi = (e + 1) * hidden / n_exp;
    const size_t before = toks.size();
    for (int64_t t = 0; t < n; ++t) if (mp[t * n_exp + e]) toks.push_back(t);
    const int64_t c = static_cast<int64_t>(toks.size() - before);
    units += c * (hi - lo);
    if (c && hi > lo) { experts.push_back(e); start.push_back(static_cast<int64_t>(toks.size())); }
    else toks.resize(before);
  }
  int64_t pairs = 0;
  for (int64_t i = 0; i < n * n_exp; ++i) pairs += mp[i];
  const int64_t k = static_cast<int64_t>(experts.size());
  // Threads only for enough work (a parallel region costs a thread wake-up).
  const int64_t macs = units * (d * (glu ? 2 : 1) + out);
  const int64_t threads = macs < (int64_t{1} << 20) ? 1
      : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k));
  std::vector<float> acc(static_cast<size_t>(threads) * n * out, 0.0f);
  // Torch's own thread pool; each chunk of experts accumulates into a private buffer.
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t tid = c0; tid < c1; ++tid) {
      float* a = acc.data() + static_cast<size_t>(tid) * n * out;
      for (int64_t i = k * tid / threads; i < k * (tid + 1) / threads; ++i) {
        const int64_t e = experts[i];
        const int64_t lo = e * hidden / n_exp, hi = (e + 1) * hidden / n_exp;
        const int64_t* tk = toks.data() + start[i];
        const int64_t c = start[i + 1] - start[i];
        // Four hidden units at a time (the last block padded with a zero-weighted
        // repeat): independent accumulators, one pass over x and the output row.
        for (int64_t j = lo; j < hi; j += 4) {
          const int64_t r = std::min<int64_t>(4, hi - j);
          const float* wu[4];
          const float* wg[4];
          const float* wd[4];
          float bu[4], bg[4];
          for (int64_t q = 0; q < 4; ++q) {
            const int64_t jj = j + std::min(q, r - 1);
            wu[q] = up + jj * d;
            wg[q] = glu ? gp + jj * d : nullptr;
            wd[q] = dp + jj * out;
            bu[q] = bup ? bup[jj] : 0.0f;
            bg[q] = bgp ? bgp[jj] : 0.0f;
          }
          for (int64_t s = 0; s < c; ++s) {
            const int64_t t = tk[s];
            const float* xt = xp + t * d;
            float u[4], v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            dot4(wu, xt, d, u);
            if (glu) {
              float g[4];
              dot4(wg, xt, d, g);
              for (int64_t q = 0; q < r; ++q) v[q] = act(g[q] + bg[q], kind) * (u[q] + bu[q]);
            } else {
              for (int64_t q = 0; q < r; ++q) v[q] = act(u[q] + bu[q], kind);
            }
            if (v[0] == 0.0f && v[1] == 0.0f && v[2] == 0.0f && v[3] == 0.0f) continue;
            float* at_row = a + t * out;
            const float *d0 = wd[0], *d1 = wd[1], *d2 = wd[2], *d3 = wd[3];
            #pragma omp simd
            for (int64_t o = 0; o < out; ++o)
              at_row[o] += v[0] * d0[o] + v[1] * d1[o] + v[2] * d2[o] + v[3] * d3[o];
          }
        }
      }
    }
  });
  auto y = torch::empty({n, out}, x.options());
  float* yp = y.data_ptr<float>();
  const float* bdp = b_down.numel() ? b_down.data_ptr<float>() : nullptr;
  fold_accumulators(acc, threads, n * out, out, bdp, yp);
  return std::make_tuple(y, pairs, units);
}

static torch::Tensor act_(torch::Tensor h, int64_t kind) {
  switch (kind) {
    case 0: return h.relu_();
    case 1: return at::gelu(h);
    case 2: return at::gelu(h, "tanh");
    case 3: return at::silu_(h);
    case 4: return h.sigmoid_();
    case 5: return h.tanh_();
    default: return h;
  }
}

// Tokens grouped by expert, any dtype: one gather, then each expert's row block
// through BLAS on the weight slices (views), experts split across torch's
// threads (each GEMM single-threaded: narrow GEMMs parallelise badly), one
// index_add into the fp32 output. Returns (y, pairs, units).
std::tuple<torch::Tensor, int64_t, int64_t> expert_ffn_grouped(
    torch::Tensor x, torch::Tensor w_up, torch::Tensor b_up, torch::Tensor w_gate,
    torch::Tensor b_gate, torch::Tensor w_down_t, torch::Tensor b_down, torch::Tensor mask,
    int64_t kind) {
  // Plain tensors: no autograd recording on the worker threads.
  x = x.detach(); w_up = w_up.detach(); b_up = b_up.detach(); w_gate = w_gate.detach();
  b_gate = b_gate.detach(); w_down_t = w_down_t.detach();
  mask = mask.to(at::kBool).contiguous();
  const int64_t n = x.size(0), hidden = w_up.size(0), out = w_down_t.size(1);
  const int64_t n_exp = mask.size(1);
  const bool glu = w_gate.numel() > 0;
  const bool* mp = mask.data_ptr<bool>();
  std::vector<int64_t> toks, start{0}, work;
  toks.reserve(n * n_exp);
  int64_t units = 0;
  for (int64_t e = 0; e < n_exp; ++e) {
    const int64_t w = (e + 1) * hidden / n_exp - e * hidden / n_exp;
    for (int64_t t = 0; t < n; ++t) if (mp[t * n_exp + e]) toks.push_back(t);
    start.push_back(static_cast<int64_t>(toks.size()));
    units += (start[e + 1] - start[e]) * w;
    work.push_back(units);
  }
  const int64_t pairs = static_cast<int64_t>(toks.size());
  auto y = torch::zeros({n, out}, x.options().dtype(at::kFloat));
  if (b_down.numel()) y.add_(b_down.to(at::kFloat));
  if (!pairs) return std::make_tuple(y, pairs, units);
  auto tokens = torch::from_blob(toks.data(), {pairs}, at::kLong).clone();
  auto xs = x.index_select(0, tokens);
  auto ys = torch::zeros({pairs, out}, x.options());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_exp));
  // Each expert goes to the thread whose equal share of the work holds its midpoint.
  std::vector<int64_t> owner(n_exp, 0);
  for (int64_t e = 0; e < n_exp && units; ++e) {
    const double mid = work[e] - 0.5 * (work[e] - (e ? work[e - 1] : 0));
    owner[e] = std::min<int64_t>(threads - 1, static_cast<int64_t>(mid * threads / units));
  }
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t tid = c0; tid < c1; ++tid) {
      for (int64_t e = 0; e < n_exp; ++e) {
        if (owner[e] != tid) continue;
        const int64_t lo = e * hidden / n_exp, w = (e + 1) * hidden / n_exp - lo;
        const int64_t c = start[e + 1] - start[e];
        if (!c || !w) continue;
        auto xe = xs.narrow(0, start[e], c);
        auto h = b_up.numel() ? at::addmm(b_up.narrow(0, lo, w), xe, w_up.narrow(0, lo, w).t())
                              : at::mm(xe, w_up.narrow(0, lo, w).t());
        if (glu) {
          auto g = b_gate.numel()
              ? at::addmm(b_gate.narrow(0, lo, w), xe, w_gate.narrow(0, lo, w).t())
              : at::mm(xe, w_gate.narrow(0, lo, w).t());
          h = act_(g, kind).mul_(h);
        } else {
          h = act_(h, kind);
        }
        auto ye = ys.narrow(0, start[e], c);
        at::mm_out(ye, h, w_down_t.narrow(0, lo, w));
      }
    }
  });
  y.index_add_(0, tokens, ys.scalar_type() == at::kFloat ? ys : ys.to(at::kFloat));
  return std::make_tuple(y, pairs, units);
}

// ---------------------------------------------------------------------------
// Grouped fp32 path for many tokens: one call per FFN, MKL's sgemm_ on the
// expert slices (no dispatcher per GEMM), no index_add.

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

extern "C" int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));

static bool g_use_blas = true;

// Whether sgemm_ is linked in (and used); ``use_blas(false)`` forces the at::mm fallback
// (for tests). Returns whether BLAS is used now.
bool use_blas(bool on) { g_use_blas = on; return g_use_blas && sgemm_ != nullptr; }

// On a worker thread: BLAS single-threaded while alive (MKL would otherwise start
// its own threads under ours).
struct OneBlasThread {
  int prev = 0;
  OneBlasThread() { if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1); }
  ~OneBlasThread() { if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev); }
};

// Row-major C[m, n] (ld ldc) = A[m, k] (row-major, ld lda) @ op(B) (+ beta * C), where
// op(B) is B[k, n] (row-major, ld ldb) or, with b_t, the transpose of B[n, k] (ld ldb).
static void gemm_rm(bool b_t, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  if (g_use_blas && sgemm_) {
    // Column-major: C^T[n, m] = op(B)^T[n, k] @ A^T[k, m].
    const char ta = b_t ? 'T' : 'N', tb = 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float one = 1.0f;
    sgemm_(&ta, &tb, &mi, &ni, &ki, &one, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto at_ = torch::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts);
  auto bt = b_t ? torch::from_blob(const_cast<float*>(b), {k, n}, {1, ldb}, opts)
                : torch::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts);
  auto ct = torch::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == 0.0f) at::mm_out(ct, at_, bt);
  else ct.mul_(beta).addmm_(at_, bt);
}

// Adds b[0:w] to each of the ``rows`` rows of h (row stride w).
static inline void add_bias_rows(float* h, const float* b, int64_t rows, int64_t w) {
  for (int64_t i = 0; i < rows; ++i) {
    float* r = h + i * w;
    #pragma omp simd
    for (int64_t j = 0; j < w; ++j) r[j] += b[j];
  }
}

// h[i, j] = gelu(h[i, j] + b[j]) (exact GELU; b may be null) for ``rows`` rows of width
// w, in one vectorised pass right after the GEMM wrote them: the formula of torch's
// vectorised GELU kernel, with ATen's Vectorized erf.
static void bias_gelu_rows(float* h, const float* b, int64_t rows, int64_t w) {
  const Vec half(0.5f), one(1.0f), alpha(static_cast<float>(M_SQRT1_2));
  const int64_t n = Vec::size();
  for (int64_t i = 0; i < rows; ++i) {
    float* r = h + i * w;
    for (int64_t j = 0; j < w; j += n) {
      const int64_t c = std::min<int64_t>(n, w - j);
      Vec x = Vec::loadu(r + j, c);
      if (b) x = x + Vec::loadu(b + j, c);
      const Vec y = x * half * (one + (x * alpha).erf());
      y.store(r + j, c);
    }
  }
}

// In place on a contiguous fp32 buffer: torch's own (vectorised) kernels, so the
// values are those of reference.apply_activation.
static void act_buf(float* p, int64_t len, int64_t kind) {
  if (len <= 0 || kind == 6) return;
  if (kind == 0) {
    #pragma omp simd
    for (int64_t i = 0; i < len; ++i) p[i] = p[i] > 0.0f ? p[i] : 0.0f;
    return;
  }
  auto t = torch::from_blob(p, {len}, at::TensorOptions().dtype(at::kFloat));
  switch (kind) {
    case 1: at::gelu_(t); break;
    case 2: at::gelu_(t, "tanh"); break;
    case 3: at::silu_(t); break;
    case 4: at::sigmoid_(t); break;
    case 5: at::tanh_(t); break;
    default: break;
  }
}

// acc[tok[i] - t0, :n] += h[i, :k] @ w[:k, :n] for i < m, straight into the output rows
// (no buffer for the product, no second pass to add it): register tiles of six rows by
// kTileCols columns (64 with AVX-512, 16 elsewhere), each weight row chunk loaded once
// for the six. Needs n a multiple of kTileCols (``down_into_rows_ok``); measured 19%
// faster than sgemm into a buffer plus the adds, at 60-400 rows x 64 x 384 on one
// thread (AVX-512).
static bool down_into_rows_ok(int64_t n) { return n % dynvec::kTileCols == 0; }

template <int R>
static void down_tile(const float* h, int64_t k, const float* w, int64_t n, int64_t c,
                      const int64_t* tok, int64_t t0, float* acc) {
  constexpr int NV = dynvec::kTileCols / dynvec::kW;
  Vec a[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) a[r][j] = Vec(0.0f);
  for (int64_t q = 0; q < k; ++q) {
    const float* wr = w + q * n + c;
    Vec wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = Vec::loadu(wr + j * dynvec::kW);
    for (int r = 0; r < R; ++r) {
      const Vec b(h[r * k + q]);
      for (int j = 0; j < NV; ++j) a[r][j] = at::vec::fmadd(b, wv[j], a[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = acc + (tok[r] - t0) * n + c;
    for (int j = 0; j < NV; ++j)
      (Vec::loadu(o + j * dynvec::kW) + a[r][j]).store(o + j * dynvec::kW);
  }
}

static void down_into_rows(const float* h, int64_t m, int64_t k, const float* w, int64_t n,
                           const int64_t* tok, int64_t t0, float* acc) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6)
    for (int64_t c = 0; c < n; c += dynvec::kTileCols)
      down_tile<6>(h + i * k, k, w, n, c, tok + i, t0, acc);
  for (; i < m; ++i)  // the last rows, one at a time
    for (int64_t c = 0; c < n; c += dynvec::kTileCols)
      down_tile<1>(h + i * k, k, w, n, c, tok + i, t0, acc);
}

// h[i, :w] = x[tok[i]] . W[lo + j] (+ b[j]) for i < m, j < w, then exact GELU with
// ``gelu``: the up (or gate) projection with the token rows read where they are (no
// gather), from wp, the weight packed [H/16, d, 16] (units in blocks of 16, each block
// input-major). Register tiles of six token rows by up to kTileCols units, each packed
// row loaded once for the six. Needs lo, w multiples of 16 (``up_from_rows_ok``).
static bool up_from_rows_ok(int64_t lo, int64_t w) { return lo % 16 == 0 && w % 16 == 0; }

template <int NC, bool GELU>
static void up_tile(const float* const* xr, int rows, int64_t d, const float* wc, const float* b,
                    float* h, int64_t ldh) {
  constexpr int PB = dynvec::kPerBlock, NV = NC * PB, W = dynvec::kW;
  Vec a[6][NV];
  for (int r = 0; r < 6; ++r)
    for (int j = 0; j < NV; ++j) a[r][j] = Vec(0.0f);
  const int64_t plane = d * 16;
  for (int64_t q = 0; q < d; ++q) {
    Vec w[NV];
    for (int j = 0; j < NV; ++j) w[j] = Vec::loadu(wc + (j / PB) * plane + q * 16 + (j % PB) * W);
    for (int r = 0; r < 6; ++r) {
      const Vec v(xr[r][q]);
      for (int j = 0; j < NV; ++j) a[r][j] = at::vec::fmadd(v, w[j], a[r][j]);
    }
  }
  const Vec half(0.5f), one(1.0f), alpha(static_cast<float>(M_SQRT1_2));
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < NV; ++j) {
      const int off = (j / PB) * 16 + (j % PB) * W;
      Vec v = a[r][j];
      if (b) v = v + Vec::loadu(b + off);
      if (GELU) v = v * half * (one + (v * alpha).erf());
      v.store(h + r * ldh + off);
    }
}

template <bool GELU>
static void up_tiles(const float* const* xr, int rows, int64_t d, const float* wc, int64_t w,
                     const float* b, float* h) {
  for (int64_t c = 0; c < w;) {
    const float* wcc = wc + (c / 16) * d * 16;
    const float* bc = b ? b + c : nullptr;
    const int64_t nb = std::min<int64_t>(dynvec::kTileBlocks, (w - c) / 16);
    switch (nb) {
      case 4: up_tile<4, GELU>(xr, rows, d, wcc, bc, h + c, w); break;
      case 3: up_tile<3, GELU>(xr, rows, d, wcc, bc, h + c, w); break;
      case 2: up_tile<2, GELU>(xr, rows, d, wcc, bc, h + c, w); break;
      default: up_tile<1, GELU>(xr, rows, d, wcc, bc, h + c, w); break;
    }
    c += 16 * nb;
  }
}

static void up_from_rows(const float* x, int64_t d, const int64_t* tok, int64_t m,
                         const float* wp, int64_t lo, int64_t w, const float* b, bool gelu,
                         float* h) {
  const float* wc = wp + (lo / 16) * d * 16;
  for (int64_t i = 0; i < m; i += 6) {
    const int rows = static_cast<int>(std::min<int64_t>(6, m - i));
    const float* xr[6];
    for (int r = 0; r < 6; ++r) xr[r] = x + tok[i + std::min(r, rows - 1)] * d;
    if (gelu) up_tiles<true>(xr, rows, d, wc, w, b, h + i * w);
    else up_tiles<false>(xr, rows, d, wc, w, b, h + i * w);
  }
}

namespace {

struct Ffn {
  const float *x, *up, *gate, *down, *bup, *bgate;
  const float *upp = nullptr, *gatep = nullptr;  // packed [H/16, d, 16] copies, or null
  const bool* mask;
  int64_t n, d, hidden, out, n_exp, kind;
  bool glu;
  int64_t lo(int64_t e) const { return e * hidden / n_exp; }
};

// A run of adjacent experts [e0, e1) that the same tokens selected: one GEMM pair.
struct Group { int64_t lo, w, start, count; };

struct Scratch {
  std::vector<int64_t> cnt, off, toks;
  std::vector<Group> groups;
  std::vector<float> xs, h, g, ys;
};

// Hidden-buffer floats per chunk of groups (activation once per chunk).
constexpr int64_t kChunkFloats = 1 << 16;

// Tokens [t0, t1) x experts [e0, e1): acc rows are tokens t0.. (ld out), accumulated into.
void run_block(const Ffn& f, int64_t t0, int64_t t1, int64_t e0, int64_t e1, float* acc,
               Scratch& s) {
  const int64_t ne = e1 - e0;
  if (ne <= 0 || t1 <= t0) return;
  // Counting sort of the (token, expert) pairs by expert, tokens ascending.
  s.cnt.assign(ne + 1, 0);
  for (int64_t t = t0; t < t1; ++t) {
    const bool* row = f.mask + t * f.n_exp + e0;
    for (int64_t j = 0; j < ne; ++j) s.cnt[j + 1] += row[j];
  }
  s.off.assign(ne + 1, 0);
  for (int64_t j = 0; j < ne; ++j) s.off[j + 1] = s.off[j] + s.cnt[j + 1];
  const int64_t pairs = s.off[ne];
  if (!pairs) return;
  s.toks.resize(pairs);
  {
    std::vector<int64_t> pos(s.off.begin(), s.off.end() - 1);
    for (int64_t t = t0; t < t1; ++t) {
      const bool* row = f.mask + t * f.n_exp + e0;
      for (int64_t j = 0; j < ne; ++j) if (row[j]) s.toks[pos[j]++] = t;
    }
  }
  // Groups: adjacent selected experts whose token lists coincide share one GEMM pair.
  s.groups.clear();
  for (int64_t j = 0; j < ne; ++j) {
    const int64_t c = s.off[j + 1] - s.off[j];
    const int64_t lo = f.lo(e0 + j), w = f.lo(e0 + j + 1) - lo;
    if (!c || !w) continue;
    if (!s.groups.empty()) {
      Group& p = s.groups.back();
      if (p.lo + p.w == lo && p.count == c &&
          std::equal(s.toks.begin() + p.start, s.toks.begin() + p.start + c,
                     s.toks.begin() + s.off[j])) {
        p.w += w;
        continue;
      }
    }
    s.groups.push_back({lo, w, s.off[j], c});
  }
  const int64_t d = f.d, out = f.out;
  // Exact GELU: bias and activation in one pass per group, while its rows are hot.
  const bool fused_act = !f.glu && f.kind == 1;
  int64_t max_c = 0;
  for (const Group& gr : s.groups) max_c = std::max(max_c, gr.count);
  // The down projection goes straight into the output rows where it can; else a buffer.
  const bool into_rows = g_use_blas && down_into_rows_ok(out);
  if (!into_rows) s.ys.resize(static_cast<size_t>(max_c * out));
  const size_t ng = s.groups.size();
  for (size_t g0 = 0; g0 < ng;) {
    // A chunk of groups whose hidden block fits kChunkFloats (at least one group).
    size_t g1 = g0;
    int64_t hsize = 0;
    while (g1 < ng && (g1 == g0 || hsize + s.groups[g1].count * s.groups[g1].w <= kChunkFloats)) {
      hsize += s.groups[g1].count * s.groups[g1].w;
      ++g1;
    }
    s.h.resize(static_cast<size_t>(hsize));
    if (f.glu) s.g.resize(static_cast<size_t>(hsize));
    int64_t ho = 0;
    for (size_t gi = g0; gi < g1; ++gi) {
      const Group& gr = s.groups[gi];
      const int64_t* tk = s.toks.data() + gr.start;
      float* h = s.h.data() + ho;
      if (f.upp && (!f.glu || f.gatep) && up_from_rows_ok(gr.lo, gr.w)) {
        // Token rows read in place; bias (and exact GELU) applied as the tiles are stored.
        up_from_rows(f.x, d, tk, gr.count, f.upp, gr.lo, gr.w, f.bup ? f.bup + gr.lo : nullptr,
                     fused_act, h);
        if (f.glu)
          up_from_rows(f.x, d, tk, gr.count, f.gatep, gr.lo, gr.w,
                       f.bgate ? f.bgate + gr.lo : nullptr, false, s.g.data() + ho);
        ho += gr.count * gr.w;
        continue;
      }
      if (s.xs.size() < static_cast<size_t>(max_c * d)) s.xs.resize(static_cast<size_t>(max_c * d));
      float* xs = s.xs.data();
      for (int64_t i = 0; i < gr.count; ++i)
        std::memcpy(xs + i * d, f.x + tk[i] * d, sizeof(float) * d);
      gemm_rm(true, gr.count, gr.w, d, xs, d, f.up + gr.lo * d, d, 0.0f, h, gr.w);
      if (fused_act) bias_gelu_rows(h, f.bup ? f.bup + gr.lo : nullptr, gr.count, gr.w);
      else if (f.bup) add_bias_rows(h, f.bup + gr.lo, gr.count, gr.w);
      if (f.glu) {
        float* gg = s.g.data() + ho;
        gemm_rm(true, gr.count, gr.w, d, xs, d, f.gate + gr.lo * d, d, 0.0f, gg, gr.w);
        if (f.bgate) add_bias_rows(gg, f.bgate + gr.lo, gr.count, gr.w);
      }
      ho += gr.count * gr.w;
    }
    if (f.glu) {
      act_buf(s.g.data(), hsize, f.kind);
      float* h = s.h.data();
      const float* gg = s.g.data();
      #pragma omp simd
      for (int64_t i = 0; i < hsize; ++i) h[i] *= gg[i];
    } else {
      if (!fused_act) act_buf(s.h.data(), hsize, f.kind);
    }
    ho = 0;
    for (size_t gi = g0; gi < g1; ++gi) {
      const Group& gr = s.groups[gi];
      const int64_t* tk = s.toks.data() + gr.start;
      if (into_rows) {
        down_into_rows(s.h.data() + ho, gr.count, gr.w, f.down + gr.lo * out, out, tk, t0, acc);
        ho += gr.count * gr.w;
        continue;
      }
      float* ys = s.ys.data();
      gemm_rm(false, gr.count, out, gr.w, s.h.data() + ho, gr.w, f.down + gr.lo * out, out,
              0.0f, ys, out);
      for (int64_t i = 0; i < gr.count; ++i) {
        float* r = acc + (tk[i] - t0) * out;
        const float* src = ys + i * out;
        #pragma omp simd
        for (int64_t j = 0; j < out; ++j) r[j] += src[j];
      }
      ho += gr.count * gr.w;
    }
    g0 = g1;
  }
}

}  // namespace

// (selected pairs, whether every row of the [N, E] mask equals the first) in one
// serial pass: cheaper than the torch reductions (each a parallel region) it replaces.
std::tuple<int64_t, bool> mask_stats(torch::Tensor mask) {
  mask = mask.to(at::kBool).contiguous();
  const int64_t n = mask.size(0), e = mask.size(1);
  const bool* mp = mask.data_ptr<bool>();
  int64_t pairs = 0;
  bool shared = true;
  for (int64_t t = 0; t < n; ++t) {
    const bool* row = mp + t * e;
    for (int64_t j = 0; j < e; ++j) { pairs += row[j]; shared &= row[j] == mp[j]; }
  }
  return std::make_tuple(pairs, shared);
}

// fp32 grouped FFN. Many tokens: token tiles split across threads (each thread owns
// its output rows); few tokens: experts split across threads by work, each thread
// accumulating into its own partial output, summed at the end. Returns (y, pairs, units).
std::tuple<torch::Tensor, int64_t, int64_t> expert_ffn_blocks(
    torch::Tensor x, torch::Tensor w_up, torch::Tensor b_up, torch::Tensor w_gate,
    torch::Tensor b_gate, torch::Tensor w_down_t, torch::Tensor b_down, torch::Tensor mask,
    int64_t kind, int64_t tile, torch::Tensor w_up_p, torch::Tensor w_gate_p) {
  x = x.detach().contiguous(); w_up = w_up.detach().contiguous();
  w_down_t = w_down_t.detach().contiguous();
  b_up = b_up.detach().contiguous();
  b_down = b_down.detach().to(at::kFloat).contiguous();
  const bool glu = w_gate.numel() > 0;
  if (glu) { w_gate = w_gate.detach().contiguous(); b_gate = b_gate.detach().contiguous(); }
  mask = mask.to(at::kBool).contiguous();
  Ffn f;
  f.n = x.size(0); f.d = x.size(1); f.hidden = w_up.size(0); f.out = w_down_t.size(1);
  f.n_exp = mask.size(1); f.kind = kind; f.glu = glu;
  TORCH_CHECK(w_up.size(1) == f.d && w_down_t.size(0) == f.hidden && mask.size(0) == f.n);
  f.x = x.data_ptr<float>(); f.up = w_up.data_ptr<float>();
  f.gate = glu ? w_gate.data_ptr<float>() : nullptr;
  f.down = w_down_t.data_ptr<float>();
  f.bup = b_up.numel() ? b_up.data_ptr<float>() : nullptr;
  f.bgate = glu && b_gate.numel() ? b_gate.data_ptr<float>() : nullptr;
  f.mask = mask.data_ptr<bool>();
  // Packed copies of the up and gate weights ([H/16, d, 16]), where the caller has them.
  auto packed_ok = [&](const torch::Tensor& p) {
    return p.numel() && p.scalar_type() == at::kFloat && p.is_contiguous() && p.dim() == 3 &&
           p.size(0) * 16 == f.hidden && p.size(1) == f.d && p.size(2) == 16;
  };
  if (packed_ok(w_up_p)) f.upp = w_up_p.data_ptr<float>();
  if (glu && packed_ok(w_gate_p)) f.gatep = w_gate_p.data_ptr<float>();
  const int64_t n = f.n, n_exp = f.n_exp, out = f.out;
  // Per-expert counts: pairs, units and the work split.
  std::vector<int64_t> cnt(n_exp, 0);
  for (int64_t t = 0; t < n; ++t) {
    const bool* row = f.mask + t * n_exp;
    for (int64_t e = 0; e < n_exp; ++e) cnt[e] += row[e];
  }
  int64_t pairs = 0, units = 0;
  std::vector<int64_t> work(n_exp + 1, 0);
  for (int64_t e = 0; e < n_exp; ++e) {
    pairs += cnt[e];
    units += cnt[e] * (f.lo(e + 1) - f.lo(e));
    work[e + 1] = units;
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  tile = std::max<int64_t>(1, tile);
  const int64_t tiles = n / tile;
  const bool by_tokens = tiles >= threads || threads == 1;
  const float* bd = b_down.numel() ? b_down.data_ptr<float>() : nullptr;
  // Token tiles: each thread starts its own rows from the bias (no pass over y first).
  auto y = torch::empty({n, out}, x.options());
  float* yp = y.data_ptr<float>();
  // Rows from the bias, serially (a parallel region costs more than this pass at the
  // sizes that take it); token tiles start their own rows instead.
  auto start_rows = [&](int64_t t0, int64_t t1) {
    for (int64_t r = t0; r < t1; ++r) {
      if (bd) std::copy(bd, bd + out, yp + r * out);
      else std::fill(yp + r * out, yp + (r + 1) * out, 0.0f);
    }
  };
  if (!units || !out || !by_tokens) start_rows(0, n);
  if (!units || !out) return std::make_tuple(y, pairs, units);
  if (by_tokens) {
    const int64_t nt = std::max<int64_t>(1, tiles);
    at::parallel_for(0, nt, 1, [&](int64_t i0, int64_t i1) {
      OneBlasThread one;
      Scratch s;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t0 = n * i / nt, t1 = n * (i + 1) / nt;
        start_rows(t0, t1);
        run_block(f, t0, t1, 0, n_exp, yp + t0 * out, s);
      }
    });
    return std::make_tuple(y, pairs, units);
  }
  // Contiguous expert ranges of about equal work, one per thread.
  std::vector<int64_t> bound(threads + 1, n_exp);
  bound[0] = 0;
  for (int64_t th = 1; th < threads; ++th) {
    const int64_t target = units * th / threads;
    int64_t e = bound[th - 1];
    while (e < n_exp && work[e + 1] <= target) ++e;
    // Round to the nearer boundary.
    if (e < n_exp && target - work[e] > work[e + 1] - target) ++e;
    bound[th] = e;
  }
  std::vector<float> partial(static_cast<size_t>((threads - 1) * n * out), 0.0f);
  at::parallel_for(0, threads, 1, [&](int64_t i0, int64_t i1) {
    OneBlasThread one;
    Scratch s;
    for (int64_t th = i0; th < i1; ++th) {
      float* acc = th == 0 ? yp : partial.data() + static_cast<size_t>((th - 1) * n * out);
      run_block(f, 0, n, bound[th], bound[th + 1], acc, s);
    }
  });
  // The partial outputs summed on this thread: this path runs for fewer tokens than
  // threads x tile, where waking the pool again costs more than the adds.
  const int64_t total = n * out;
  for (int64_t th = 1; th < threads; ++th) {
    const float* p = partial.data() + static_cast<size_t>((th - 1) * total);
    #pragma omp simd
    for (int64_t i = 0; i < total; ++i) yp[i] += p[i];
  }
  return std::make_tuple(y, pairs, units);
}
