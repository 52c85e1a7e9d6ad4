/* One decode step's attention over a bf16 KV cache, on CPUs with AVX512-BF16 (see decode_kernel.py).

   torch's bf16 matrix products reorder the cache into oneDNN's blocked layout on every call, and with the
   few query rows of a decode step they ran at about 7.5-12.4 GB/s on a 2-core EPYC that streams 25-34 GB/s.
   Here each key and value is read once, straight from the cache's buffer:

   - scores: each query row against each key by vdpbf16ps (bf16 pairs, fp32 sums), 16 keys at a time;
   - softmax: online, in fp32, per run of 16 keys (flash attention's running max and sum);
   - values: two tokens per vdpbf16ps, their weights rounded to bf16, summed in fp32.

   Each thread takes a run of one key/value head's tokens; the runs are merged by their maxima and sums at the
   end. The threads are OpenMP's, which is torch's own runtime once torch is loaded, so they are torch's. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 16
#define MAX_DIM 256
#define TILE 16

/* exp(x) for x <= 0, as Cephes' expf computes it: 2^n exp(r) with |r| <= ln(2)/2. */
static inline __m512 exp_le0(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* Lane t of the result is the sum of v[t]'s 16 lanes. */
static inline __m512 sum16(const __m512 *v) {
    __m512 pairs[8], quads[4], halves[2];
    for (int i = 0; i < 8; i++)
        pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                                 _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)
        halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Sum j's lane i holds dimension 32 (j / 2) + 8 (i / 4) + 4 (j % 2) + i % 4 (unpacklo, unpackhi per 128 bits). */
static void unpermute(float *x, int dim) {
    float y[MAX_DIM];
    for (int j = 0; j < dim / 16; j++)
        for (int i = 0; i < 16; i++)
            y[32 * (j / 2) + 8 * (i / 4) + 4 * (j % 2) + i % 4] = x[16 * j + i];
    for (int d = 0; d < dim; d++)
        x[d] = y[d];
}

/* `rows` query rows of one head against its tokens [start, end): the run's maxima, sums and fp32 outputs.
   Inlined for each head size, so the loops over the head's dimensions unroll and stay in registers.

   The weighted sum takes two tokens per vdpbf16ps: their values interleaved (unpack) against their weights,
   rounded to bf16 as transformers' eager attention rounds them. Interleaving within 128-bit lanes permutes
   the dimensions of the sums; `unpermute` puts them back at the end of the run. */
static inline __attribute__((always_inline)) void run(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                                      int rows, const int dim, long start, long end, float scale,
                                                      float *m_out, float *l_out, float *acc) {
    const int words = dim / 32, vectors = dim / 16;
    __m512bh query[MAX_ROWS][MAX_DIM / 32];
    float m[MAX_ROWS];
    __m512 sums[MAX_ROWS];
    uint32_t weights[MAX_ROWS][TILE / 2] __attribute__((aligned(64)));
    __m512i pairs[TILE / 2][MAX_DIM / 16];
    for (int r = 0; r < rows; r++) {
        for (int j = 0; j < words; j++)
            query[r][j] = (__m512bh)_mm512_loadu_si512(q + r * dim + 32 * j);
        m[r] = -INFINITY;
        sums[r] = _mm512_setzero_ps();
        for (int j = 0; j < dim; j++)
            acc[r * dim + j] = 0.0f;
    }
    for (long t0 = start; t0 < end; t0 += TILE) {
        const int n = end - t0 < TILE ? (int)(end - t0) : TILE;
        const __mmask16 live = (__mmask16)((1u << n) - 1u);
        const uint16_t *keys = k + t0 * dim;
        for (int r = 0; r < rows; r++) {
            __m512 dots[TILE];
            for (int t = 0; t < TILE; t++) {
                __m512 d = _mm512_setzero_ps();
                if (t < n)
                    for (int j = 0; j < words; j++)
                        d = _mm512_dpbf16_ps(d, query[r][j], (__m512bh)_mm512_loadu_si512(keys + t * dim + 32 * j));
                dots[t] = d;
            }
            __m512 s = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), live, sum16(dots), _mm512_set1_ps(scale));
            float top = _mm512_reduce_max_ps(s);
            float now = top > m[r] ? top : m[r];
            if (now > m[r] && m[r] != -INFINITY) {
                __m512 c = _mm512_set1_ps(expf(m[r] - now));
                sums[r] = _mm512_mul_ps(sums[r], c);
                for (int j = 0; j < vectors; j++)
                    _mm512_storeu_ps(acc + r * dim + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(acc + r * dim + 16 * j), c));
            }
            m[r] = now;
            __m512 p = _mm512_maskz_mov_ps(live, exp_le0(_mm512_sub_ps(s, _mm512_set1_ps(now))));
            sums[r] = _mm512_add_ps(sums[r], p);
            _mm256_store_si256((__m256i *)weights[r], (__m256i)_mm512_cvtneps_pbh(p));
        }
        for (int t = 0; t < n; t += 2) {
            const uint16_t *a = v + (t0 + t) * dim, *b = a + dim;
            for (int j = 0; j < words; j++) {
                __m512i x = _mm512_loadu_si512(a + 32 * j);
                __m512i y = t + 1 < n ? _mm512_loadu_si512(b + 32 * j) : _mm512_setzero_si512();
                pairs[t / 2][2 * j] = _mm512_unpacklo_epi16(x, y);
                pairs[t / 2][2 * j + 1] = _mm512_unpackhi_epi16(x, y);
            }
        }
        for (int r = 0; r < rows; r++) {
            __m512 out[MAX_DIM / 16];
            for (int j = 0; j < vectors; j++)
                out[j] = _mm512_loadu_ps(acc + r * dim + 16 * j);
            for (int t = 0; t < n; t += 2) {
                __m512bh w = (__m512bh)_mm512_set1_epi32((int)weights[r][t / 2]);
                for (int j = 0; j < vectors; j++)
                    out[j] = _mm512_dpbf16_ps(out[j], (__m512bh)pairs[t / 2][j], w);
            }
            for (int j = 0; j < vectors; j++)
                _mm512_storeu_ps(acc + r * dim + 16 * j, out[j]);
        }
    }
    for (int r = 0; r < rows; r++) {
        m_out[r] = m[r];
        l_out[r] = _mm512_reduce_add_ps(sums[r]);
        unpermute(acc + r * dim, dim);
    }
}

static void run_any(const uint16_t *q, const uint16_t *k, const uint16_t *v, int rows, int dim, long start,
                    long end, float scale, float *m, float *l, float *acc) {
    switch (dim) {
    case 64: run(q, k, v, rows, 64, start, end, scale, m, l, acc); break;
    case 128: run(q, k, v, rows, 128, start, end, scale, m, l, acc); break;
    case 256: run(q, k, v, rows, 256, start, end, scale, m, l, acc); break;
    default: run(q, k, v, rows, dim, start, end, scale, m, l, acc); break;
    }
}

/* q: [heads][rows][dim]; k, v: [heads][room][dim], of which the first `length` tokens count; out: [heads][rows]
   [dim]. All bf16, contiguous. dim: a multiple of 32 up to MAX_DIM; rows: up to MAX_ROWS. threads: torch's
   count, which OpenMP keeps per calling thread. 0, or -1 for shapes it doesn't take, -2 when memory runs out. */
int decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, long heads, int rows,
                     int dim, long room, long length, float scale, int threads) {
    if (rows < 1 || rows > MAX_ROWS || dim < 32 || dim > MAX_DIM || dim % 32 || length < 1 || length > room ||
        threads < 1)
        return -1;
    /* Two runs a thread, so that the heads' runs divide evenly between the threads, of at least 256 tokens. */
    long chunks = (2 * threads + heads - 1) / heads;
    long most = (length + 255) / 256;
    chunks = chunks < most ? chunks : most;
    long chunk = (length + chunks - 1) / chunks;
    chunk = (chunk + TILE - 1) / TILE * TILE;
    chunks = (length + chunk - 1) / chunk;
    long runs = heads * chunks;
    float *m = malloc(sizeof(float) * runs * rows * (dim + 2));
    if (!m)
        return -2;
    float *l = m + runs * rows, *acc = l + runs * rows;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long u = 0; u < runs; u++) {
        long h = u / chunks, start = (u % chunks) * chunk;
        long end = start + chunk < length ? start + chunk : length;
        run_any(q + h * rows * dim, k + h * room * dim, v + h * room * dim, rows, dim, start, end, scale,
                m + u * rows, l + u * rows, acc + u * rows * dim);
    }
    for (long h = 0; h < heads; h++)
        for (int r = 0; r < rows; r++) {
            float top = -INFINITY, total = 0.0f, o[MAX_DIM];
            for (long c = 0; c < chunks; c++)
                top = m[(h * chunks + c) * rows + r] > top ? m[(h * chunks + c) * rows + r] : top;
            for (int j = 0; j < dim; j++)
                o[j] = 0.0f;
            for (long c = 0; c < chunks; c++) {
                long u = h * chunks + c;
                float w = expf(m[u * rows + r] - top);
                total += w * l[u * rows + r];
                for (int j = 0; j < dim; j++)
                    o[j] += w * acc[(u * rows + r) * dim + j];
            }
            for (int j = 0; j < dim; j += 16) {
                __m512 x = _mm512_div_ps(_mm512_loadu_ps(o + j), _mm512_set1_ps(total));
                _mm256_storeu_si256((__m256i *)(out + (h * rows + r) * dim + j), (__m256i)_mm512_cvtneps_pbh(x));
            }
        }
    free(m);
    return 0;
}
