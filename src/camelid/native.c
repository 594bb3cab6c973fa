/* camelid's CPU kernels for quantized inference: int8 and 4-bit weights, against float32 activations rounded to
 * int8 per block of 32 inside the products (for int8 weights, when 2 to PANEL_MIN - 1 rows share a call or a row
 * is not a multiple of SCALE_BLOCK long: to int16 per row).
 *
 * At batch 1 a small model's decode reads every weight once per token and does little else, so what counts is
 * how many bytes the weights take and how little happens between the products. PyTorch spends about as long
 * dispatching a decoder layer's ~10 small operations as it does in its products; here a whole forward pass over
 * the decoder's layers is one call.
 *
 * Weights are int8 with a float scale per block of SCALE_BLOCK weights along each row (as llama.cpp's Q8_0 has
 * per 32): one outlier weight coarsens only its own block's grid. Activations are rounded to int8 per block of 32
 * (see panel8 and tile8_row), or to int16 per row (see PANEL_MIN).
 *
 * Built by camelid.native with the machine's C compiler on first use, once per instruction-set path: the
 * vector code is written for AVX2 (with F16C and FMA) and uses VNNI's dot products where the path has them. Work
 * is split over a small pool of threads that spin between the steps of one call and sleep between calls. Every
 * entry point takes a lock: calls from several Python threads run one after another.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* ---- thread pool ---------------------------------------------------------------------------------------- */

typedef void (*task_fn)(void *ctx, int t, int nt);

#define MAX_THREADS 64
/* How long a worker spins for the next task before it sleeps. Waking a sleeping thread takes ~0.1 ms, as long
 * as a whole task at batch 1; a thread that finished its share early must not fall asleep before the next. */
#define SPIN_SECONDS 2e-3
/* Spinning threads offer their core every this many pauses (~10 us): on a busy machine the thread they wait for
 * may be the one waiting for a core. Alone on the machine, sched_yield returns at once. */
#define YIELD_ROUNDS 512

static struct {
    int size; /* workers started; every one takes part in every task (some with nothing to do) */
    pid_t pid; /* the process that started them: after a fork the child has none */
    atomic_uint gen; /* bumped once per task */
    atomic_int done; /* workers finished with the current task */
    task_fn fn;
    void *ctx;
    int nt; /* threads the current task is split over, the caller's included */
    int sleepers;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void *worker_main(void *arg) {
    /* the task count when this worker was started: a task posted before it runs must not be missed */
    int t = (int)((uintptr_t)arg & 0xff);
    unsigned seen = (unsigned)((uintptr_t)arg >> 8);
    for (;;) {
        double until = now() + SPIN_SECONDS;
        for (int i = 1; atomic_load_explicit(&pool.gen, memory_order_acquire) == seen; i++) {
            cpu_relax();
            if (i % 256 == 0 && now() > until) break;
            if (i % YIELD_ROUNDS == 0) sched_yield();
        }
        if (atomic_load_explicit(&pool.gen, memory_order_acquire) == seen) {
            pthread_mutex_lock(&pool.mu);
            pool.sleepers++;
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            pool.sleepers--;
            pthread_mutex_unlock(&pool.mu);
        }
        seen = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (t < pool.nt) pool.fn(pool.ctx, t, pool.nt);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
    return NULL;
}

/* fork(): no call may be in flight, and the child starts with no workers and fresh locks (the parent's
 * sleeping workers would otherwise still count as waiters on a condition variable the child broadcasts to). */
static void before_fork(void) { pthread_mutex_lock(&call_lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&call_lock); }
static void after_fork_child(void) {
    pthread_mutex_t fresh_mutex = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
    pool.mu = fresh_mutex;
    pool.cv = fresh_cond;
    call_lock = fresh_mutex;
    pool.size = pool.sleepers = 0;
    pool.pid = getpid();
}

/* Start workers until there are nt - 1 of them (none are ever stopped). Returns the threads available. */
static int pool_grow(int nt) {
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (pool.pid == 0) {
        pthread_atfork(before_fork, after_fork_parent, after_fork_child);
        pool.pid = getpid();
    }
    while (pool.size < nt - 1) {
        pthread_t th;
        uintptr_t arg = ((uintptr_t)atomic_load(&pool.gen) << 8) | (uintptr_t)(pool.size + 1);
        if (pthread_create(&th, NULL, worker_main, (void *)arg) != 0) break;
        pthread_detach(th);
        pool.size++;
    }
    return nt < pool.size + 1 ? nt : pool.size + 1;
}

/* Run fn(ctx, t, nt) for t = 0..nt-1 on nt threads (this one is t = 0) and wait for all of them. */
static void parallel(task_fn fn, void *ctx, int nt) {
    if (nt <= 1 || pool.size == 0) {
        fn(ctx, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.nt = nt;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    if (pool.sleepers) pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(ctx, 0, nt);
    for (int i = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < pool.size; i++) {
        cpu_relax();
        if (i % YIELD_ROUNDS == 0) sched_yield();
    }
}

/* [lo, hi) of n items for thread t of nt, in multiples of `align` (the last thread takes the rest). */
static void share(int n, int align, int t, int nt, int *lo, int *hi) {
    int units = (n + align - 1) / align;
    int a = (int)((int64_t)units * t / nt) * align, b = (int)((int64_t)units * (t + 1) / nt) * align;
    *lo = a < n ? a : n;
    *hi = b < n ? b : n;
}

/* ---- vector helpers ------------------------------------------------------------------------------------- */

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 widen8(const int8_t *p) { /* 8 int8 weights as floats */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* e^x to about 2 ulp for x <= 88 (x below -87 is taken as -87: e^-87 ~ 1.6e-38), as Cephes' expf does it:
 * x = n ln2 + r with |r| <= ln2 / 2, e^r from its Taylor polynomial, 2^n put into the exponent bits. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts, exact product first */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

static float dot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0;
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    s = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy(float a, const float *x, float *y, int n) { /* y += a * x */
    int i = 0;
#ifdef __AVX2__
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* x[i] = e^(x[i] - shift); returns the sum */
static float exp_shifted(float *x, int n, float shift) {
    int i = 0;
    float s = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), vs = _mm256_set1_ps(shift);
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    s = hsum(acc);
#endif
    for (; i < n; i++) s += x[i] = expf(x[i] - shift);
    return s;
}

/* h[i] = silu(g[i]) * u[i] = g[i] / (1 + e^-g[i]) * u[i] */
static void swiglu(const float *g, const float *u, float *h, int n) {
    int i = 0;
#ifdef __AVX2__
    __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 vg = _mm256_loadu_ps(g + i);
        __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), vg)));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_div_ps(vg, den), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) h[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void rms_norm(const float *x, const float *w, float eps, float *y, int n) {
    float r = 1.0f / sqrtf(dot(x, x, n) / n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* ---- int8 x int16 products, and what every product shares --------------------------------------------------- */

/* The products are integer dot products. int8 weights take their inputs rounded to int8 per block of Q4_BLOCK,
 * as 4-bit ones do (below), for one input row or PANEL_MIN and more (see PANEL_MIN). Other inputs are rounded to
 * int16 with a scale per row (max |x| / 32767, a relative error of at most
 * 1/65534 of the row's largest element, far below the weights' 1/254), and int8 x int16 pairs are multiplied
 * and summed exactly (vpmaddwd). Each block's exact int32 sum is scaled by the block's scale in float32. */

#define SCALE_BLOCK 64 /* weights per scale along a row; the last block of a row may be shorter */

#define Q4_BLOCK 32 /* 4-bit weights per (scale, offset) pair */
#define Q4_ROWS 8 /* 4-bit weight rows interleaved in one group */

typedef struct {
    const void *w; /* bits 8: int8 [out, in]; bits 4: [out / Q4_ROWS, in / Q4_BLOCK, 128] bytes (see tile4) */
    const void *scale; /* bits 8: float [out, blocks], blocks = ceil(in / SCALE_BLOCK); bits 4: float16
                          [out / Q4_ROWS, in / Q4_BLOCK, pairs, Q4_ROWS], the scales d then the offsets m */
    const float *bias; /* [out] or NULL */
    int out, in, bits;
    int pairs; /* bits 4: 2 (d and m stored), or 1 (d only, m = -8 d: llama.cpp's Q4_0, 4.5 bits a weight) */
} qmatrix;

static inline int blocks_of(int in) { return (in + SCALE_BLOCK - 1) / SCALE_BLOCK; }

typedef struct { /* n input rows rounded as the products need them */
    int16_t *q; /* for int8 weights: [n, in] int16, a scale per row */
    float *scale; /* [n] */
    int8_t *q8; /* for 4-bit and int8 weights: [n, in] int8, a scale per block of Q4_BLOCK */
    float *scale8; /* [n, in / Q4_BLOCK] */
    float *sums8; /* [n, in / Q4_BLOCK]: each block's sum of its rounded values, times its scale */
    int32_t *total8; /* [n, in / Q4_BLOCK]: the same sums, not scaled */
    uint8_t *panel; /* for int8 weights and many rows: [in / Q4_BLOCK, 256], one group of rows (see panel8) */
    float *pd; /* [in / Q4_BLOCK, Q4_ROWS], the group's scales */
    int n, in;
} qinput;

enum { STORE, ADD };

static float max_abs(const float *x, int n) {
    float top = 0;
    int i = 0;
#ifdef __AVX2__
    __m256 vtop = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) vtop = _mm256_max_ps(vtop, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(vtop), _mm256_extractf128_ps(vtop, 1));
    t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
    top = _mm_cvtss_f32(_mm_max_ss(t4, _mm_movehdup_ps(t4)));
#endif
    for (; i < n; i++) top = fmaxf(top, fabsf(x[i]));
    return top;
}

static void quantize_input(const float *x, int ldx, qinput *xi) {
    for (int c = 0; c < xi->n; c++) {
        const float *row = x + (int64_t)c * ldx;
        int16_t *q = xi->q + (int64_t)c * xi->in;
        /* (FLT_MIN: for rows of tiny numbers 1 / s would overflow) */
        float top = max_abs(row, xi->in), s = top > 0 ? fmaxf(top / 32767, FLT_MIN) : 1.0f, inv = 1.0f / s;
        xi->scale[c] = s;
        int i = 0;
#ifdef __AVX2__
        __m256 vinv = _mm256_set1_ps(inv);
        for (; i + 16 <= xi->in; i += 16) { /* round to nearest even, as lrintf; all within +-32767 */
            __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + i), vinv));
            __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + i + 8), vinv));
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
            _mm256_storeu_si256((__m256i *)(q + i), packed);
        }
#endif
        for (; i < xi->in; i++) q[i] = (int16_t)lrintf(fminf(fmaxf(row[i] * inv, -32767.0f), 32767.0f));
    }
}

/* For 4-bit and int8 weights: each block of Q4_BLOCK inputs rounded to int8 with its own
 * scale (max |block| / 127), as llama.cpp's Q8_0; for 4-bit weights their own rounding (1/30 of a block's range)
 * stays ~10x the larger error, for int8 ones (1/254 of a block's largest) the two are alike. */
static void quantize_input8(const float *x, int ldx, qinput *xi) {
    const int nb = xi->in / Q4_BLOCK;
    for (int c = 0; c < xi->n; c++)
        for (int k = 0; k < nb; k++) {
            const float *row = x + (int64_t)c * ldx + k * Q4_BLOCK;
            int8_t *q = xi->q8 + (int64_t)c * xi->in + k * Q4_BLOCK;
            float top = max_abs(row, Q4_BLOCK), s = top > 0 ? fmaxf(top / 127, FLT_MIN) : 1.0f, inv = 1.0f / s;
            int32_t total = 0;
            int i = 0;
#ifdef __AVX2__
            __m256 vinv = _mm256_set1_ps(inv);
            __m256i v[4];
            for (int j = 0; j < 4; j++) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + 8 * j), vinv));
            __m256i sum = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
            total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1))));
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
            bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)q, bytes);
            i = Q4_BLOCK;
#endif
            for (; i < Q4_BLOCK; i++) total += q[i] = (int8_t)lrintf(row[i] * inv);
            xi->scale8[(int64_t)c * nb + k] = s;
            xi->sums8[(int64_t)c * nb + k] = s * (float)total;
            xi->total8[(int64_t)c * nb + k] = total;
        }
}

/* y[c * ldy + r] (=|+=) x_scale[c] * sum over blocks k of w_scale[r, k] * dot(w[r, k], xq[c, k]) + bias[r], for
 * R weight rows from r0 and C input rows from c0. */
static inline __attribute__((always_inline)) void tile(const qmatrix *m, int r0, int R, const qinput *xi, int c0,
                                                       int C, float *y, int ldy, int mode) {
    const int in = m->in, nb = blocks_of(in);
    const int8_t *w = (const int8_t *)m->w + (int64_t)r0 * in;
    const float *ws = (const float *)m->scale + (int64_t)r0 * nb;
    const int16_t *x = xi->q + (int64_t)c0 * xi->in;
    float sums[4][4] = {{0}};
#ifdef __AVX2__
    __m256 total[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) total[r][c] = _mm256_setzero_ps();
#endif
    for (int k = 0; k < nb; k++) {
        int i = k * SCALE_BLOCK, end = i + SCALE_BLOCK < in ? i + SCALE_BLOCK : in;
#ifdef __AVX2__
        if (i + 16 <= end) {
            __m256i acc[4][4];
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_si256();
            for (; i + 16 <= end; i += 16) {
                __m256i wv[4];
                if ((i & 63) == 0) /* the next tile's rows, a line at a time: the hardware prefetcher alone lagged */
                    for (int r = 0; r < R; r++)
                        _mm_prefetch((const char *)(w + (int64_t)(R + r) * in + i + 256), _MM_HINT_T0);
                for (int r = 0; r < R; r++)
                    wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + (int64_t)r * in + i)));
                for (int c = 0; c < C; c++) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(x + (int64_t)c * in + i));
                    for (int r = 0; r < R; r++) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(wv[r], xv));
                }
            }
            for (int r = 0; r < R; r++) {
                __m256 scale = _mm256_set1_ps(ws[(int64_t)r * nb + k]);
                for (int c = 0; c < C; c++)
                    total[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][c]), scale, total[r][c]);
            }
        }
#endif
        for (; i < end; i++)
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++)
                    sums[r][c] += ws[(int64_t)r * nb + k] * (float)(w[(int64_t)r * in + i] * x[(int64_t)c * in + i]);
    }
    for (int r = 0; r < R; r++) {
        float b = m->bias ? m->bias[r0 + r] : 0.0f;
        for (int c = 0; c < C; c++) {
#ifdef __AVX2__
            sums[r][c] += hsum(total[r][c]);
#endif
            float v = sums[r][c] * xi->scale[c0 + c] + b;
            float *dst = y + (int64_t)(c0 + c) * ldy + r0 + r;
            *dst = mode == ADD ? *dst + v : v;
        }
    }
}

/* ---- 4-bit x int8 products ------------------------------------------------------------------------------- */

/* 4-bit weights: each block of Q4_BLOCK weights along a row has codes q in 0..15 and a float16 pair (d, m), the
 * weight being d q + m (5 bits a weight: a batch-1 decode reads 0.6x of int8's bytes). Rows come in groups of
 * Q4_ROWS, interleaved as llama.cpp repacks its Q4_0 for x86: a block of a group is 128 bytes, 4 loads of 32;
 * in load L, bytes 4j..4j+3 hold row j's weights 4L..4L+3 in their low nibbles and 16+4L..16+4L+3 in their
 * high ones. So one u8 x s8 dot-product instruction (vpdpbusd, or vpmaddubsw and vpmaddwd without VNNI) takes
 * 4 weights of each of the 8 rows against 4 inputs broadcast to every lane, and the 8 rows' sums come out in
 * the 8 lanes of one register: no horizontal sums, and each block's scales applied to 8 rows at once. Over a
 * block, w . x = d sx (q . xq) + m (sx sum(xq)), xq the input's int8 (quantize_input8). */

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, frac = h & 0x3FF, bits;
    if (exp == 0x1F)
        bits = sign | 0x7F800000u | (frac << 13);
    else if (exp != 0)
        bits = sign | ((exp + 112) << 23) | (frac << 13);
    else if (frac == 0)
        bits = sign;
    else { /* subnormal: frac * 2^-24 */
        float v = (float)frac * 5.9604644775390625e-8f;
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#ifdef __AVX2__
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) { /* acc += 4-byte dot products, per lane */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else /* no saturation: 2 x 15 x 127 fits int16 */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* How a block's codes stand for its weights: */
enum {
    CODES_4BIT, /* w = d q + m, q in 0..15 */
    CODES_OFFSET, /* int8: q = w + 128, unsigned; m unused */
    CODES_SIGNED, /* int8: q = w, for paths without VNNI (vpmaddubsw would saturate on (w + 128) x xq pairs) */
};

/* acc[c] += for block k of Q4_BLOCK and input rows c0 + c, the 8 rows' w . x: codes[g] holds weights 4g..4g+3
 * of each row, one row a lane, as `form` says. 4-bit: d sx (q . xq) + m (sx sum(xq)). int8: d sx (w . xq), the
 * integer dot product exact on every path (the offset taken off as 128 sum(xq); signed codes multiplied as
 * |w| . sign(xq, w)), so that every path rounds alike. */
static inline __attribute__((always_inline)) void block_dots(const __m256i codes[8], __m256 d, __m256 mv,
                                                             const qinput *xi, int c0, int C, int k, __m256 *acc,
                                                             int form) {
    const int in = xi->in, nb = in / Q4_BLOCK;
    __m256i size[8];
    if (form == CODES_SIGNED)
        for (int g = 0; g < 8; g++) size[g] = _mm256_abs_epi8(codes[g]);
    for (int c = 0; c < C; c++) {
        const int8_t *xc = xi->q8 + (int64_t)(c0 + c) * in + k * Q4_BLOCK;
        int64_t at = (int64_t)(c0 + c) * nb + k;
        __m256i isum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            int32_t four;
            memcpy(&four, xc + 4 * g, 4);
            __m256i x4 = _mm256_set1_epi32(four);
            isum = form == CODES_SIGNED ? dot_u8s8(isum, size[g], _mm256_sign_epi8(x4, codes[g]))
                                        : dot_u8s8(isum, codes[g], x4);
        }
        if (form == CODES_OFFSET) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(128 * xi->total8[at]));
        __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), d);
        acc[c] = _mm256_fmadd_ps(dot, _mm256_set1_ps(xi->scale8[at]), acc[c]);
        if (form == CODES_4BIT) acc[c] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xi->sums8[at]), acc[c]);
    }
}
#endif

/* y[(c0 + c) * ldy + r0 + j] (=|+=) out[c][j] + bias[r0 + j], for j < rows and c < C: a tile's sums, stored. */
static inline void store_group(const qmatrix *m, int r0, int rows, float out[][Q4_ROWS], int c0, int C, float *y,
                               int ldy, int mode) {
    for (int c = 0; c < C; c++)
        for (int j = 0; j < rows; j++) {
            int r = r0 + j;
            float v = out[c][j] + (m->bias ? m->bias[r] : 0.0f), *dst = y + (int64_t)(c0 + c) * ldy + r;
            *dst = mode == ADD ? *dst + v : v;
        }
}

/* y[c * ldy + 8G + j] (=|+=) row 8G + j of the weights . input row c, for the C input rows from c0. */
static inline __attribute__((always_inline)) void tile4(const qmatrix *m, int G, const qinput *xi, int c0, int C,
                                                        float *y, int ldy, int mode) {
    const int in = m->in, nb = in / Q4_BLOCK, P = m->pairs;
    const uint8_t *w = (const uint8_t *)m->w + (int64_t)G * nb * 128;
    const uint16_t *dm = (const uint16_t *)m->scale + (int64_t)G * nb * P * Q4_ROWS;
    float out[4][Q4_ROWS];
#ifdef __AVX2__
    __m256 acc[4];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int k = 0; k < nb; k++) {
        const uint8_t *b = w + (int64_t)k * 128;
        _mm_prefetch((const char *)(b + 1024), _MM_HINT_T0);
        _mm_prefetch((const char *)(b + 1024 + 64), _MM_HINT_T0);
        __m256i codes[8];
        for (int L = 0; L < 4; L++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(b + 32 * L));
            codes[L] = _mm256_and_si256(v, nibble);
            codes[L + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        }
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + (int64_t)k * P * Q4_ROWS)));
        __m256 mv = P == 2 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + (int64_t)k * 16 + Q4_ROWS)))
                           : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f)); /* exact, as float16 m = -8 d would be */
        block_dots(codes, d, mv, xi, c0, C, k, acc, CODES_4BIT);
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(out[c], acc[c]);
#else
    for (int c = 0; c < C; c++)
        for (int j = 0; j < Q4_ROWS; j++) out[c][j] = 0;
    for (int k = 0; k < nb; k++) {
        const uint8_t *b = w + (int64_t)k * 128;
        for (int j = 0; j < Q4_ROWS; j++) {
            float d = half_to_float(dm[(int64_t)k * P * Q4_ROWS + j]);
            float mk = P == 2 ? half_to_float(dm[(int64_t)k * 16 + 8 + j]) : -8.0f * d;
            for (int c = 0; c < C; c++) {
                const int8_t *xc = xi->q8 + (int64_t)(c0 + c) * in + k * Q4_BLOCK;
                int32_t isum = 0;
                for (int L = 0; L < 4; L++)
                    for (int t = 0; t < 4; t++) {
                        uint8_t v = b[32 * L + 4 * j + t];
                        isum += (v & 0x0F) * xc[4 * L + t] + (v >> 4) * xc[16 + 4 * L + t];
                    }
                int64_t at = (int64_t)(c0 + c) * nb + k;
                out[c][j] = fmaf((float)isum * d, xi->scale8[at], out[c][j]);
                out[c][j] = fmaf(mk, xi->sums8[at], out[c][j]);
            }
        }
    }
#endif
    store_group(m, G * Q4_ROWS, Q4_ROWS, out, c0, C, y, ldy, mode);
}

/* ---- int8 x int8 products -------------------------------------------------------------------------------- */

/* From PANEL_MIN input rows (a prompt), and for a single row (one sequence's decode step), int8 weights (rows a
 * multiple of SCALE_BLOCK long) are multiplied as 4-bit ones are: the inputs rounded to int8 per block of
 * Q4_BLOCK (quantize_input8, as llama.cpp rounds them for its Q8_0), one u8 x s8 instruction doing 32 products
 * where the int16 path's does 16, each block's scales applied to 8 rows at once. For a prompt, each group of
 * Q4_ROWS weight rows is copied once per pass into a panel in tile4's layout after unpacking: 8 loads of 32 bytes
 * per block, load g holding weights 4g..4g+3 of each row (with VNNI, each weight plus 128 as an unsigned byte:
 * CODES_OFFSET). A single row reads the weights as stored (tile8_row; a panel per call cost 1.5x), with results
 * bit-identical to the panels': a sequence decoded alone gets the products its prompt would. 2 to PANEL_MIN - 1
 * rows (several sequences decoded together) keep int16 inputs: at SmolLM2-135M's widths their products are
 * bound by arithmetic, and int8 inputs, direct or in panels, measured 20% slower at 8 rows. So a sequence's
 * rounding depends on how many rows share its call. */
#define PANEL_MIN 16
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__)) && !defined(__AVXVNNI__)
#define PANEL_OFFSET 0 /* the panel holds w itself (CODES_SIGNED) */
#else
#define PANEL_OFFSET 128
#endif

#ifdef __AVX2__
/* out[b] lane j = r[j] lane b: an 8 x 8 transpose of 32-bit lanes */
static inline void transpose8(const __m256i r[8], __m256i out[8]) {
    __m256i t[8], u[8];
    for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
    }
    for (int h = 0; h < 8; h += 4) {
        u[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);
        u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);
        u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);
        u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
    }
    for (int b = 0; b < 4; b++) {
        out[b] = _mm256_permute2x128_si256(u[b], u[b + 4], 0x20);
        out[b + 4] = _mm256_permute2x128_si256(u[b], u[b + 4], 0x31);
    }
}
#endif

/* Rows r0..r0 + rows - 1 of m (bits 8, in a multiple of SCALE_BLOCK; rows <= Q4_ROWS) as a panel (the rest
 * zero), with each block's Q4_ROWS scales in d [in / Q4_BLOCK, Q4_ROWS]. */
static void panel8(const qmatrix *m, int r0, int rows, uint8_t *panel, float *d) {
    const int in = m->in, nb = in / Q4_BLOCK, nb64 = blocks_of(in);
    const int8_t *w = (const int8_t *)m->w + (int64_t)r0 * in;
    const float *ws = (const float *)m->scale + (int64_t)r0 * nb64;
    for (int k = 0; k < nb; k++) {
        uint8_t *b = panel + (int64_t)k * 256;
        for (int j = 0; j < Q4_ROWS; j++)
            d[k * Q4_ROWS + j] = j < rows ? ws[(int64_t)j * nb64 + k * Q4_BLOCK / SCALE_BLOCK] : 0;
#ifdef __AVX2__
        if (rows == Q4_ROWS) { /* an 8 x 8 transpose of 4-byte groups */
            __m256i r[8], g4[8];
            for (int j = 0; j < 8; j++)
                r[j] = _mm256_loadu_si256((const __m256i *)(w + (int64_t)j * in + k * Q4_BLOCK));
            transpose8(r, g4);
            const __m256i flip = _mm256_set1_epi8((char)PANEL_OFFSET);
            for (int g = 0; g < 8; g++) _mm256_storeu_si256((__m256i *)(b + 32 * g), _mm256_xor_si256(g4[g], flip));
            continue;
        }
#endif
        for (int g = 0; g < 8; g++)
            for (int j = 0; j < Q4_ROWS; j++)
                for (int t = 0; t < 4; t++)
                    b[32 * g + 4 * j + t] =
                        (uint8_t)((j < rows ? w[(int64_t)j * in + k * Q4_BLOCK + 4 * g + t] : 0) + PANEL_OFFSET);
    }
}

/* y[c * ldy + r0 + j] (=|+=) row r0 + j of the weights . input row c, for j < rows and the C input rows from c0,
 * from the panel of those rows. */
static inline __attribute__((always_inline)) void tile8(const qmatrix *m, int r0, int rows, const uint8_t *panel,
                                                        const float *pd, const qinput *xi, int c0, int C, float *y,
                                                        int ldy, int mode) {
    const int nb = m->in / Q4_BLOCK;
    float out[4][Q4_ROWS];
#ifdef __AVX2__
    __m256 acc[4];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    for (int k = 0; k < nb; k++) {
        __m256i codes[8];
        for (int g = 0; g < 8; g++) codes[g] = _mm256_loadu_si256((const __m256i *)(panel + (int64_t)k * 256 + 32 * g));
        __m256 d = _mm256_loadu_ps(pd + (int64_t)k * Q4_ROWS);
        block_dots(codes, d, d, xi, c0, C, k, acc, PANEL_OFFSET ? CODES_OFFSET : CODES_SIGNED);
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(out[c], acc[c]);
#else
    for (int c = 0; c < C; c++)
        for (int j = 0; j < Q4_ROWS; j++) out[c][j] = 0;
    for (int k = 0; k < nb; k++) {
        const uint8_t *b = panel + (int64_t)k * 256;
        for (int j = 0; j < Q4_ROWS; j++) {
            float d = pd[k * Q4_ROWS + j];
            for (int c = 0; c < C; c++) {
                const int8_t *xc = xi->q8 + (int64_t)(c0 + c) * m->in + k * Q4_BLOCK;
                int64_t at = (int64_t)(c0 + c) * nb + k;
                int32_t isum = -PANEL_OFFSET * xi->total8[at];
                for (int g = 0; g < 8; g++)
                    for (int t = 0; t < 4; t++) isum += b[32 * g + 4 * j + t] * xc[4 * g + t];
                out[c][j] = fmaf((float)isum * d, xi->scale8[at], out[c][j]);
            }
        }
    }
#endif
    store_group(m, r0, rows, out, c0, C, y, ldy, mode);
}

/* The same products as tile8 for the Q4_ROWS rows from r0 and one input row (a decode step of one sequence),
 * read straight from m's rows (no panel). Reading 8 rows side by side, 32 bytes of each at a time, measured
 * ~25 GB/s where one row after another reads at the machine's ~40, so the rows are read one after another: each
 * row's exact integer dot product with each block of the input goes to `sums` (this thread's panel buffer,
 * unused on this path), and those are then scaled and added in tile8's lanes and order: results bit-identical to
 * tile8's. */
static inline __attribute__((always_inline)) void tile8_row(const qmatrix *m, int r0, const qinput *xi, float *y,
                                                            int mode) {
    const int in = m->in, nb = in / Q4_BLOCK, nb64 = blocks_of(in);
    const int8_t *w = (const int8_t *)m->w + (int64_t)r0 * in;
    const float *ws = (const float *)m->scale + (int64_t)r0 * nb64;
    float out[1][Q4_ROWS] = {{0}};
#ifdef __AVX2__
    /* [row][block], each row padded to a whole number of 8 blocks: in + 224 bytes at most, of the buffer's 8 in */
    int32_t *sums = (int32_t *)xi->panel;
    const int stride = (nb + 7) & ~7, K8 = nb & ~7;
    for (int j = 0; j < Q4_ROWS; j++) {
        const int8_t *row = w + (int64_t)j * in;
        for (int k = 0; k < nb; k += 8) {
            const int blocks = k < K8 ? 8 : nb - k;
            __m256i dots[8];
            for (int b = 0; b < 8; b++) { /* past the row: zeros */
                __m256i raw = b < blocks ? _mm256_loadu_si256((const __m256i *)(row + (k + b) * Q4_BLOCK))
                                         : _mm256_setzero_si256();
                __m256i x = b < blocks ? _mm256_loadu_si256((const __m256i *)(xi->q8 + (k + b) * Q4_BLOCK))
                                       : _mm256_setzero_si256();
                /* the codes as block_dots' CODES_OFFSET (w + 128) or CODES_SIGNED (|w| . sign(x, w)) */
                dots[b] = PANEL_OFFSET
                              ? dot_u8s8(_mm256_setzero_si256(), _mm256_xor_si256(raw, _mm256_set1_epi8((char)0x80)), x)
                              : dot_u8s8(_mm256_setzero_si256(), _mm256_abs_epi8(raw), _mm256_sign_epi8(x, raw));
            }
            /* the 8 blocks' lanes summed, block b in lane b */
            __m256i p0 = _mm256_hadd_epi32(dots[0], dots[1]), p1 = _mm256_hadd_epi32(dots[2], dots[3]);
            __m256i p2 = _mm256_hadd_epi32(dots[4], dots[5]), p3 = _mm256_hadd_epi32(dots[6], dots[7]);
            __m256i q0 = _mm256_hadd_epi32(p0, p1), q1 = _mm256_hadd_epi32(p2, p3);
            _mm256_storeu_si256((__m256i *)(sums + (int64_t)j * stride + k),
                                _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20),
                                                 _mm256_permute2x128_si256(q0, q1, 0x31)));
        }
    }
    __m256 acc = _mm256_setzero_ps();
    for (int k = 0; k < nb; k += 8) {
        const int blocks = k < K8 ? 8 : nb - k;
        __m256i r[8], isums[8]; /* isums[b]: block k + b of the 8 rows, row j in lane j */
        for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_si256((const __m256i *)(sums + (int64_t)j * stride + k));
        transpose8(r, isums);
        __m256 d = _mm256_setzero_ps(); /* the 8 rows' scales of the block */
        for (int b = 0; b < blocks; b++) {
            const int kb = k + b, s = kb * Q4_BLOCK / SCALE_BLOCK;
            if (kb % (SCALE_BLOCK / Q4_BLOCK) == 0)
                d = _mm256_setr_ps(ws[s], ws[nb64 + s], ws[2 * nb64 + s], ws[3 * nb64 + s], ws[4 * nb64 + s],
                                   ws[5 * nb64 + s], ws[6 * nb64 + s], ws[7 * nb64 + s]);
            __m256i isum = isums[b];
            if (PANEL_OFFSET) /* the codes held w + 128: 128 sum(xq) off, as in tile8 */
                isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(PANEL_OFFSET * xi->total8[kb]));
            acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), d), _mm256_set1_ps(xi->scale8[kb]), acc);
        }
    }
    _mm256_storeu_ps(out[0], acc);
#else
    for (int k = 0; k < nb; k++)
        for (int j = 0; j < Q4_ROWS; j++) {
            const int8_t *wj = w + (int64_t)j * in + k * Q4_BLOCK, *xk = xi->q8 + k * Q4_BLOCK;
            float d = ws[(int64_t)j * nb64 + k * Q4_BLOCK / SCALE_BLOCK];
            int32_t isum = 0;
            for (int i = 0; i < Q4_BLOCK; i++) isum += wj[i] * xk[i];
            out[0][j] = fmaf((float)isum * d, xi->scale8[k], out[0][j]);
        }
#endif
    store_group(m, r0, Q4_ROWS, out, 0, 1, y, 0, mode);
}

static inline int panel_product(const qmatrix *m, int n) {
    return m->bits == 8 && n >= PANEL_MIN && m->in % SCALE_BLOCK == 0;
}

#define X_BLOCK 64 /* input rows per pass over the weights: 64 x 4K int16 stay in L2 */

/* Rows [lo, hi) of y = x @ w.T: the weights are read once per X_BLOCK input rows. */
static void product_rows8(const qmatrix *m, int lo, int hi, const qinput *xi, float *y, int ldy, int mode) {
    for (int c0 = 0; c0 < xi->n; c0 += X_BLOCK) {
        int c1 = c0 + X_BLOCK < xi->n ? c0 + X_BLOCK : xi->n;
        int r = lo;
        if (c1 - c0 == 1) { /* one input row: four weight rows share each load of it */
            for (; r + 4 <= hi; r += 4) tile(m, r, 4, xi, c0, 1, y, ldy, mode);
        } else { /* a weight row at a time against four input rows: 4 int and 4 float sums stay in registers */
            for (; r < hi; r++) {
                int c = c0;
                for (; c + 4 <= c1; c += 4) tile(m, r, 1, xi, c, 4, y, ldy, mode);
                for (; c < c1; c++) tile(m, r, 1, xi, c, 1, y, ldy, mode);
            }
        }
        for (; r < hi; r++)
            for (int c = c0; c < c1; c++) tile(m, r, 1, xi, c, 1, y, ldy, mode);
    }
}

/* The same for 4-bit weights, [lo, hi) whole groups of Q4_ROWS rows: a group's block is unpacked once for up
 * to four input rows. */
static void product_rows4(const qmatrix *m, int lo, int hi, const qinput *xi, float *y, int ldy, int mode) {
    for (int c0 = 0; c0 < xi->n; c0 += X_BLOCK) {
        int c1 = c0 + X_BLOCK < xi->n ? c0 + X_BLOCK : xi->n;
        for (int G = lo / Q4_ROWS; G < hi / Q4_ROWS; G++) {
            int c = c0;
            for (; c + 4 <= c1; c += 4) tile4(m, G, xi, c, 4, y, ldy, mode);
            if (c1 - c == 3) tile4(m, G, xi, c, 3, y, ldy, mode);
            else if (c1 - c == 2) tile4(m, G, xi, c, 2, y, ldy, mode);
            else if (c1 - c == 1) tile4(m, G, xi, c, 1, y, ldy, mode);
        }
    }
}

/* The same for int8 weights and many input rows (rounded by quantize_input8): rows [lo, hi), Q4_ROWS at a
 * time put in a panel (panel, pd: this thread's) once per pass. */
static void product_panels(const qmatrix *m, int lo, int hi, const qinput *xi, uint8_t *panel, float *pd, float *y,
                           int ldy, int mode) {
    for (int c0 = 0; c0 < xi->n; c0 += X_BLOCK) {
        int c1 = c0 + X_BLOCK < xi->n ? c0 + X_BLOCK : xi->n;
        for (int r = lo; r < hi; r += Q4_ROWS) {
            int rows = hi - r < Q4_ROWS ? hi - r : Q4_ROWS, c = c0;
            panel8(m, r, rows, panel, pd);
            if (rows == Q4_ROWS) {
                for (; c + 4 <= c1; c += 4) tile8(m, r, Q4_ROWS, panel, pd, xi, c, 4, y, ldy, mode);
                for (; c < c1; c++) tile8(m, r, Q4_ROWS, panel, pd, xi, c, 1, y, ldy, mode);
            } else {
                for (; c < c1; c++) tile8(m, r, rows, panel, pd, xi, c, 1, y, ldy, mode);
            }
        }
    }
}

/* The same for one input row, without panels: rows [lo, hi) Q4_ROWS at a time straight from m (tile8_row), a
 * last group of fewer rows through a panel. */
static void product_row8(const qmatrix *m, int lo, int hi, const qinput *xi, float *y, int ldy, int mode) {
    int r = lo;
    for (; r + Q4_ROWS <= hi; r += Q4_ROWS) tile8_row(m, r, xi, y, mode);
    if (r < hi) product_panels(m, r, hi, xi, xi->panel, xi->pd, y, ldy, mode);
}

/* Round the input as m's weights need it, then rows [lo, hi) of y (=|+=) x @ m.T. */
static void product(const qmatrix *m, int lo, int hi, const float *x, int ldx, qinput *xi, float *y, int ldy,
                    int mode, int rounded) {
    if (panel_product(m, xi->n)) {
        if (!rounded) quantize_input8(x, ldx, xi);
        product_panels(m, lo, hi, xi, xi->panel, xi->pd, y, ldy, mode);
    } else if (m->bits == 8 && xi->n == 1 && m->in % SCALE_BLOCK == 0) {
        if (!rounded) quantize_input8(x, ldx, xi);
        product_row8(m, lo, hi, xi, y, ldy, mode);
    } else if (m->bits == 4) {
        if (!rounded) quantize_input8(x, ldx, xi);
        product_rows4(m, lo, hi, xi, y, ldy, mode);
    } else {
        if (!rounded) quantize_input(x, ldx, xi);
        product_rows8(m, lo, hi, xi, y, ldy, mode);
    }
}

/* Each thread rounds the whole input itself, into its own buffer (n x in: little next to n x in x out). */
typedef struct {
    int16_t *q;
    int8_t *q8;
    float *scale, *scale8, *sums8, *pd;
    int32_t *total8;
    uint8_t *panel;
} thread_buffers;

static qinput thread_input(const thread_buffers *b, int t, int n, int width, int in) {
    int64_t blocks = (int64_t)t * n * (width / Q4_BLOCK), group = (int64_t)t * Q4_ROWS * width;
    qinput xi = {b->q + (int64_t)t * n * width, b->scale + (int64_t)t * n, b->q8 + (int64_t)t * n * width,
                 b->scale8 + blocks, b->sums8 + blocks, b->total8 + blocks, b->panel + group,
                 b->pd + group / Q4_BLOCK, n, in};
    return xi;
}

static void free_buffers(thread_buffers *b) {
    free(b->q);
    free(b->q8);
    free(b->scale);
    free(b->scale8);
    free(b->sums8);
    free(b->total8);
    free(b->panel);
    free(b->pd);
}

static int alloc_buffers(thread_buffers *b, int nt, int n, int width) {
    size_t blocks = (size_t)nt * n * (width / Q4_BLOCK) + 1, group = (size_t)nt * Q4_ROWS * width + 1;
    b->q = malloc(sizeof(int16_t) * (size_t)nt * n * width);
    b->q8 = malloc((size_t)nt * n * width);
    b->scale = malloc(sizeof(float) * (size_t)nt * n);
    b->scale8 = malloc(sizeof(float) * blocks);
    b->sums8 = malloc(sizeof(float) * blocks);
    b->total8 = malloc(sizeof(int32_t) * blocks);
    b->panel = malloc(group);
    b->pd = malloc(sizeof(float) * (group / Q4_BLOCK + 1));
    if (b->q && b->q8 && b->scale && b->scale8 && b->sums8 && b->total8 && b->panel && b->pd) return 0;
    free_buffers(b);
    return -1;
}

typedef struct {
    const qmatrix *m;
    const float *x;
    int n;
    float *y;
    thread_buffers buf;
} linear_task;

static void linear_run(void *p, int t, int nt) {
    linear_task *a = p;
    int lo, hi;
    qinput xi = thread_input(&a->buf, t, a->n, a->m->in, a->m->in);
    share(a->m->out, Q4_ROWS, t, nt, &lo, &hi);
    product(a->m, lo, hi, a->x, a->m->in, &xi, a->y, a->m->out, STORE, 0);
}

/* y [n, out] = x [n, in] @ w.T (+ bias) for int8 (bits 8) or 4-bit (bits 4, `pairs` as qmatrix's) weights, on
 * `threads` threads. Returns 0, or -1 without memory. */
int camelid_linear(const void *w, const void *scale, const float *bias, int out, int in, int bits, int pairs,
                   const float *x, int n, float *y, int threads) {
    qmatrix m = {w, scale, bias, out, in, bits, pairs};
    linear_task a = {&m, x, n, y};
    pthread_mutex_lock(&call_lock);
    int nt = pool_grow(threads), status = alloc_buffers(&a.buf, nt, n, in);
    if (status == 0) {
        parallel(linear_run, &a, nt);
        free_buffers(&a.buf);
    }
    pthread_mutex_unlock(&call_lock);
    return status;
}

/* Round each block of SCALE_BLOCK weights of w [out, in] to int8 with the scale max|block| / 127 (to nearest,
 * ties to even); an all-zero block gets the scale 1. */
typedef struct {
    const float *w;
    int out, in;
    int8_t *q;
    float *scale;
} quantize_task;

static void quantize_row8(const float *w, int in, int8_t *qrow, float *srow) {
    for (int k = 0; k < blocks_of(in); k++) {
        int start = k * SCALE_BLOCK, n = start + SCALE_BLOCK < in ? SCALE_BLOCK : in - start;
        const float *row = w + start;
        int8_t *q = qrow + start;
        float top = max_abs(row, n), s = top > 0 ? fmaxf(top / 127, FLT_MIN) : 1.0f, inv = 1.0f / s;
        srow[k] = s;
        int i = 0;
#ifdef __AVX2__
        __m256 vinv = _mm256_set1_ps(inv);
        for (; i + 32 <= n; i += 32) {
            __m256i v[4];
            for (int j = 0; j < 4; j++)
                v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + i + 8 * j), vinv));
            /* two packs leave 4-byte groups in the order a0 b0 c0 d0 | a1 b1 c1 d1: put them back in order */
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
            bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(q + i), bytes);
        }
#endif
        for (; i < n; i++) q[i] = (int8_t)lrintf(row[i] * inv);
    }
}

static void quantize_run(void *p, int t, int nt) {
    quantize_task *a = p;
    int lo, hi, nb = blocks_of(a->in);
    share(a->out, 1, t, nt, &lo, &hi);
    for (int r = lo; r < hi; r++)
        quantize_row8(a->w + (int64_t)r * a->in, a->in, a->q + (int64_t)r * a->in, a->scale + (int64_t)r * nb);
}

void camelid_quantize_rows(const float *w, int out, int in, int8_t *q, float *scale, int threads) {
    quantize_task a = {w, out, in, q, scale};
    pthread_mutex_lock(&call_lock);
    parallel(quantize_run, &a, pool_grow(threads));
    pthread_mutex_unlock(&call_lock);
}

/* Round each block of Q4_BLOCK weights of w [out, in] (in a multiple of Q4_BLOCK) to 4-bit codes q and a
 * float16 pair (d, m), the weight being d q + m. The pair is the weighted least-squares fit over the codes of
 * the best of Q4_STEPS + 1 grids between the block's minimum and maximum, each weight counted by how large it
 * is (as llama.cpp's K-quants search theirs, without rounding d and m to 6-bit multiples of a super-block's);
 * the codes are then rounded again on the float16 pair that is stored. */
#define Q4_STEPS 20

static inline uint16_t float_to_half(float f) {
#ifdef __F16C__
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, mag = x & 0x7FFFFFFFu;
    if (mag >= 0x7F800000u) return (uint16_t)(sign | 0x7C00 | (mag > 0x7F800000u ? 0x200 : 0));
    if (mag >= 0x477FF000u) return (uint16_t)(sign | 0x7C00); /* rounds to >= 65520: infinity */
    if (mag < 0x38800000u) { /* below the smallest normal half: a multiple of 2^-24, ties to even */
        float a;
        memcpy(&a, &mag, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(a * 16777216.0f));
    }
    uint32_t r = mag + 0xFFF + ((mag >> 13) & 1); /* round the 13 dropped bits to nearest, ties to even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
#endif
}

/* The weighted sums of one grid's codes l: sum wt l, sum wt l^2, sum wt l x; the codes are round(iscale * xs)
 * clamped to 0..15, xs being the block less its minimum. Summed in 8 lanes and then across them in the same
 * order on every path (the plain C one imitates the vector one), so that the blocks are the same bytes. */
static inline float lanes_sum(const float p[8]) { /* as hsum adds a vector's lanes */
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
}

static inline void grid_sums(const float *xs, const float *x, const float *wt, float iscale, float *sl, float *sl2,
                             float *slx) {
#ifdef __AVX2__
    __m256 va = _mm256_setzero_ps(), vb = _mm256_setzero_ps(), vc = _mm256_setzero_ps();
    __m256 vi = _mm256_set1_ps(iscale), zero = _mm256_setzero_ps(), top = _mm256_set1_ps(15.0f);
    for (int i = 0; i < Q4_BLOCK; i += 8) {
        __m256 l = _mm256_round_ps(_mm256_mul_ps(vi, _mm256_loadu_ps(xs + i)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        l = _mm256_min_ps(_mm256_max_ps(l, zero), top);
        __m256 wl = _mm256_mul_ps(_mm256_loadu_ps(wt + i), l);
        va = _mm256_add_ps(va, wl);
        vb = _mm256_fmadd_ps(wl, l, vb);
        vc = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x + i), vc);
    }
    *sl = hsum(va), *sl2 = hsum(vb), *slx = hsum(vc);
#else
    float a[8] = {0}, b[8] = {0}, c[8] = {0};
    for (int i = 0; i < Q4_BLOCK; i += 8)
        for (int j = 0; j < 8; j++) {
            float l = fminf(fmaxf(nearbyintf(iscale * xs[i + j]), 0.0f), 15.0f), wl = wt[i + j] * l;
            a[j] += wl;
            b[j] = fmaf(wl, l, b[j]);
            c[j] = fmaf(wl, x[i + j], c[j]);
        }
    *sl = lanes_sum(a), *sl2 = lanes_sum(b), *slx = lanes_sum(c);
#endif
}

static void quantize_block4(const float *x, uint8_t *block) { /* a Q4_1 block: d, m, 16 bytes */
    float lo = x[0], hi = x[0], sum2 = 0;
    for (int i = 0; i < Q4_BLOCK; i++) {
        lo = fminf(lo, x[i]);
        hi = fmaxf(hi, x[i]);
        sum2 += x[i] * x[i];
    }
    float best_d = 0, best_m = lo;
    if (hi > lo) {
        float av = sqrtf(sum2 / Q4_BLOCK), wt[Q4_BLOCK], xs[Q4_BLOCK], sw = 0, sx = 0, sxx = 0, best = INFINITY;
        for (int i = 0; i < Q4_BLOCK; i++) {
            wt[i] = av + fabsf(x[i]);
            xs[i] = x[i] - lo;
            sw += wt[i], sx += wt[i] * x[i], sxx += wt[i] * x[i] * x[i];
        }
        for (int step = 0; step <= Q4_STEPS; step++) {
            float sl, sl2, slx;
            grid_sums(xs, x, wt, (15.0f - 1.0f + 0.1f * step) / (hi - lo), &sl, &sl2, &slx);
            float det = sw * sl2 - sl * sl;
            if (!(det > 0)) continue;
            float d = (sw * slx - sl * sx) / det, m = (sl2 * sx - sl * slx) / det;
            /* sum wt (d l + m - x)^2, expanded */
            float err = d * d * sl2 + 2 * d * m * sl + m * m * sw - 2 * d * slx - 2 * m * sx + sxx;
            if (err < best) best = err, best_d = d, best_m = m;
        }
    }
    uint16_t hd = float_to_half(best_d), hm = float_to_half(best_m);
    float d = half_to_float(hd), m = half_to_float(hm), inv = d != 0 ? 1.0f / d : 0.0f;
    memcpy(block, &hd, 2);
    memcpy(block + 2, &hm, 2);
    uint8_t *q = block + 4;
    for (int j = 0; j < Q4_BLOCK / 2; j++) {
        int a = (int)fminf(fmaxf(nearbyintf((x[j] - m) * inv), 0.0f), 15.0f);
        int b = (int)fminf(fmaxf(nearbyintf((x[j + 16] - m) * inv), 0.0f), 15.0f);
        q[j] = (uint8_t)(a | b << 4);
    }
}

typedef struct {
    const float *w;
    int out, in;
    uint8_t *blocks;
} quantize4_task;

static void quantize4_run(void *p, int t, int nt) {
    quantize4_task *a = p;
    int lo, hi, nb = a->in / Q4_BLOCK;
    share(a->out, 1, t, nt, &lo, &hi);
    for (int r = lo; r < hi; r++)
        for (int k = 0; k < nb; k++)
            quantize_block4(a->w + (int64_t)r * a->in + k * Q4_BLOCK, a->blocks + ((int64_t)r * nb + k) * 20);
}

/* w [out, in] (in a multiple of Q4_BLOCK) as llama.cpp's Q4_1 blocks (float16 d and m, 16 bytes of codes), the
 * pair fitted as above: camelid_pack4 takes them as it takes a GGUF file's. */
void camelid_quantize_rows4(const float *w, int out, int in, uint8_t *blocks, int threads) {
    quantize4_task a = {w, out, in, blocks};
    pthread_mutex_lock(&call_lock);
    parallel(quantize4_run, &a, pool_grow(threads));
    pthread_mutex_unlock(&call_lock);
}

/* ---- 4-bit blocks of GGUF files, repacked -------------------------------------------------------------- */

enum { GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q4_K = 12 }; /* ggml's type numbers */

/* Block k (of Q4_BLOCK weights) of a row of `type` blocks at `row`: its 32 codes and its float16 d and m. Q4_0's
 * m is -8 d (exact in float16); Q4_K's are its super-block's d and dmin times the sub-block's 6-bit scale and
 * minimum (ggml's get_scale_min_k4), rounded to float16. */
static void block_codes(const uint8_t *row, int type, int k, uint8_t codes[32], uint16_t *d, uint16_t *m) {
    const uint8_t *qs;
    int high = 0;
    if (type == GGML_Q4_K) {
        const uint8_t *sb = row + (int64_t)(k / 8) * 144, *sc = sb + 4;
        int j = k % 8, scale, minimum;
        uint16_t hd, hdmin;
        memcpy(&hd, sb, 2);
        memcpy(&hdmin, sb + 2, 2);
        if (j < 4) {
            scale = sc[j] & 63;
            minimum = sc[j + 4] & 63;
        } else {
            scale = (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4);
            minimum = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
        }
        *d = float_to_half(half_to_float(hd) * (float)scale);
        *m = float_to_half(-half_to_float(hdmin) * (float)minimum);
        qs = sb + 16 + 32 * (j / 2); /* 32 bytes per pair of sub-blocks: the even one's low nibbles, the odd's high */
        high = j % 2;
        for (int i = 0; i < 32; i++) codes[i] = high ? qs[i] >> 4 : qs[i] & 0x0F;
        return;
    }
    const uint8_t *b = row + (int64_t)k * (type == GGML_Q4_0 ? 18 : 20);
    memcpy(d, b, 2);
    if (type == GGML_Q4_0)
        *m = float_to_half(-8.0f * half_to_float(*d));
    else
        memcpy(m, b + 2, 2);
    qs = b + (type == GGML_Q4_0 ? 2 : 4);
    for (int i = 0; i < 16; i++) {
        codes[i] = qs[i] & 0x0F;
        codes[i + 16] = qs[i] >> 4;
    }
}

typedef struct {
    const uint8_t *src;
    int type, rows, cols;
    const int32_t *rows_from;
    uint8_t *q;
    uint16_t *dm; /* pairs (d, m) or d alone per block and row, as qmatrix's */
    int pairs;
} pack4_task;

static void pack4_run(void *p, int t, int nt) {
    pack4_task *a = p;
    int lo, hi, nb = a->cols / Q4_BLOCK;
    int64_t row_bytes = a->type == GGML_Q4_K ? (int64_t)a->cols / 256 * 144
                                             : (int64_t)nb * (a->type == GGML_Q4_0 ? 18 : 20);
    share(a->rows / Q4_ROWS, 1, t, nt, &lo, &hi);
    for (int G = lo; G < hi; G++)
        for (int j = 0; j < Q4_ROWS; j++) {
            int r = G * Q4_ROWS + j, from = a->rows_from ? a->rows_from[r] : r;
            const uint8_t *row = a->src + from * row_bytes;
            for (int k = 0; k < nb; k++) {
                uint8_t codes[32], *b = a->q + ((int64_t)G * nb + k) * 128;
                uint16_t *dm = a->dm + ((int64_t)G * nb + k) * a->pairs * Q4_ROWS;
                if (a->type != GGML_Q4_K) { /* Q4_0/Q4_1 bytes are weights i and 16 + i already: 4 at a time */
                    int size = a->type == GGML_Q4_0 ? 18 : 20;
                    const uint8_t *blk = row + (int64_t)k * size, *qs = blk + size - 16;
                    memcpy(&dm[j], blk, 2);
                    if (a->pairs == 2) { /* (with 1, Q4_0 only, the kernels make m = -8 d) */
                        if (a->type == GGML_Q4_0)
                            dm[Q4_ROWS + j] = float_to_half(-8.0f * half_to_float(dm[j]));
                        else
                            memcpy(&dm[Q4_ROWS + j], blk + 2, 2);
                    }
                    for (int L = 0; L < 4; L++) memcpy(b + 32 * L + 4 * j, qs + 4 * L, 4);
                    continue;
                }
                block_codes(row, a->type, k, codes, &dm[j], &dm[Q4_ROWS + j]);
                for (int L = 0; L < 4; L++)
                    for (int i = 0; i < 4; i++)
                        b[32 * L + 4 * j + i] = (uint8_t)(codes[4 * L + i] | codes[16 + 4 * L + i] << 4);
            }
        }
}

/* Rows of Q4_0, Q4_1 or Q4_K blocks (`type`: ggml's number) in the 4-bit kernels' layout (tile4's): q
 * [rows / Q4_ROWS, cols / Q4_BLOCK, 128], dm [rows / Q4_ROWS, cols / Q4_BLOCK, pairs, Q4_ROWS] (pairs 2: d and m;
 * 1, for Q4_0 only: d alone). Output row r is the source's row rows_from[r] (NULL: r). rows must be a multiple of
 * Q4_ROWS, cols of Q4_BLOCK (256 for Q4_K). Returns 0, or -1 for a type it does not take or pairs 1 with another
 * type than Q4_0. */
int camelid_pack4(const uint8_t *src, int type, int rows, int cols, const int32_t *rows_from, uint8_t *q,
                  uint16_t *dm, int pairs, int threads) {
    if (type != GGML_Q4_0 && type != GGML_Q4_1 && type != GGML_Q4_K) return -1;
    if (pairs != 2 && !(pairs == 1 && type == GGML_Q4_0)) return -1;
    pack4_task a = {src, type, rows, cols, rows_from, q, dm, pairs};
    pthread_mutex_lock(&call_lock);
    parallel(pack4_run, &a, pool_grow(threads));
    pthread_mutex_unlock(&call_lock);
    return 0;
}

enum { GGML_Q8_0 = 8 };

/* A row of Q8_0, Q4_0 or Q4_1 blocks as the float32 weights it stands for, computed as the gguf package and
 * camelid.gguf_file do (each product of a code and a float16 scale is exact in float32, so the result is the same
 * bits whatever the order). */
static void dequantize_row(const uint8_t *row, int type, int cols, float *out) {
    int size = type == GGML_Q8_0 ? 34 : type == GGML_Q4_0 ? 18 : 20;
    for (int k = 0; k < cols / 32; k++) {
        const uint8_t *b = row + (int64_t)k * size;
        uint16_t hd, hm;
        memcpy(&hd, b, 2);
        float d = half_to_float(hd), *o = out + k * 32;
        if (type == GGML_Q8_0) {
            for (int i = 0; i < 32; i++) o[i] = (float)(int8_t)b[2 + i] * d;
        } else if (type == GGML_Q4_0) {
            for (int i = 0; i < 16; i++) {
                o[i] = (float)((b[2 + i] & 0x0F) - 8) * d;
                o[i + 16] = (float)((b[2 + i] >> 4) - 8) * d;
            }
        } else {
            memcpy(&hm, b + 2, 2);
            float m = half_to_float(hm);
            for (int i = 0; i < 16; i++) {
                o[i] = (float)(b[4 + i] & 0x0F) * d + m;
                o[i + 16] = (float)(b[4 + i] >> 4) * d + m;
            }
        }
    }
}

typedef struct {
    const uint8_t *src;
    int type, out, in;
    const int32_t *rows_from;
    int8_t *q;
    float *scale;
    int failed;
} stored8_task;

static void stored8_run(void *p, int t, int nt) {
    stored8_task *a = p;
    int lo, hi, nb = blocks_of(a->in), size = a->type == GGML_Q8_0 ? 34 : a->type == GGML_Q4_0 ? 18 : 20;
    float *row = malloc(sizeof(float) * a->in);
    if (!row) {
        a->failed = 1;
        return;
    }
    share(a->out, 1, t, nt, &lo, &hi);
    for (int r = lo; r < hi; r++) {
        int from = a->rows_from ? a->rows_from[r] : r;
        dequantize_row(a->src + (int64_t)from * (a->in / 32) * size, a->type, a->in, row);
        quantize_row8(row, a->in, a->q + (int64_t)r * a->in, a->scale + (int64_t)r * nb);
    }
    free(row);
}

/* Rows of Q8_0, Q4_0 or Q4_1 blocks (`type`: ggml's number; in a multiple of 32) as int8 weights, exactly as
 * camelid_quantize_rows makes them from the dequantized floats, a row at a time: the float32 matrix never exists.
 * Output row r is the source's row rows_from[r] (NULL: r). Returns 0, -1 for a type it does not take, -2 without
 * memory. */
int camelid_quantize_stored_rows(const uint8_t *src, int type, int out, int in, const int32_t *rows_from, int8_t *q,
                                 float *scale, int threads) {
    if (type != GGML_Q8_0 && type != GGML_Q4_0 && type != GGML_Q4_1) return -1;
    stored8_task a = {src, type, out, in, rows_from, q, scale, 0};
    pthread_mutex_lock(&call_lock);
    parallel(stored8_run, &a, pool_grow(threads));
    pthread_mutex_unlock(&call_lock);
    return a.failed ? -2 : 0;
}

/* ---- the decoder's layers -------------------------------------------------------------------------------- */

typedef struct {
    const float *attn_norm, *mlp_norm;
    qmatrix qkv; /* q, k, v stacked: [(H + 2K) D, dim] */
    qmatrix o; /* [dim, H D] */
    qmatrix gate_up; /* gate then up: [2 I, dim] */
    qmatrix down; /* [dim, I] */
} layer_weights;

typedef struct {
    int n_layers, dim, n_heads, n_kv, head_dim, inter;
    float eps;
    const layer_weights *layers;
    const float *final_norm;
} decoder;

typedef struct {
    const decoder *d;
    const layer_weights *lw;
    int n; /* tokens (rows) in this call */
    float *x; /* [n, dim], the residual stream, updated in place */
    const int64_t *row; /* [n] each token's row of the cache */
    const int64_t *pos; /* [n] each token's position (its slot in that row) */
    const float *cos, *sin; /* [n, D], sin signed as camelid.model.rope_cos_sin makes it */
    float *k_cache, *v_cache; /* this layer's [B, K, S, D] */
    int S;
    float *xn, *qkv, *att, *gu, *h, *scores; /* scratch: [n, dim], [n, (H+2K)D], [n, HD], [n, 2I], [n, I], [nt, S] */
    thread_buffers buf; /* each thread's rounded input, up to [n, width] */
    int width;
} step;

static void norm_run(void *p, int t, int nt, const float *w) {
    step *s = p;
    int lo, hi, dim = s->d->dim;
    share(s->n, 1, t, nt, &lo, &hi);
    for (int j = lo; j < hi; j++) rms_norm(s->x + (int64_t)j * dim, w, s->d->eps, s->xn + (int64_t)j * dim, dim);
}

static void attn_norm_run(void *p, int t, int nt) { norm_run(p, t, nt, ((step *)p)->lw->attn_norm); }
static void mlp_norm_run(void *p, int t, int nt) { norm_run(p, t, nt, ((step *)p)->lw->mlp_norm); }

/* This thread's share of y (=|+=) x @ m.T, x [n, m->in] rounded into the thread's own buffer first. */
static void share_product(step *s, int t, int nt, const qmatrix *m, const float *x, float *y, int ldy, int mode) {
    int lo, hi;
    share(m->out, Q4_ROWS, t, nt, &lo, &hi);
    qinput xi = thread_input(&s->buf, t, s->n, s->width, m->in);
    product(m, lo, hi, x, m->in, &xi, y, ldy, mode, 0);
}

static void qkv_run(void *p, int t, int nt) {
    step *s = p;
    share_product(s, t, nt, &s->lw->qkv, s->xn, s->qkv, s->lw->qkv.out, STORE);
}

/* rotate x [D] in place: x * cos + roll(x, D/2) * sin */
static void rope(float *x, const float *cos, const float *sin, int D) {
    float tmp[512];
    int half = D / 2;
    memcpy(tmp, x, sizeof(float) * D);
    for (int i = 0; i < D; i++) x[i] = tmp[i] * cos[i] + tmp[(i + half) % D] * sin[i];
}

static void rope_store_run(void *p, int t, int nt) {
    step *s = p;
    const decoder *d = s->d;
    int H = d->n_heads, K = d->n_kv, D = d->head_dim, width = (H + 2 * K) * D;
    int lo, hi;
    share(s->n * (H + K), 1, t, nt, &lo, &hi);
    for (int u = lo; u < hi; u++) { /* one head of one token: H query heads, then K key heads */
        int j = u / (H + K), head = u % (H + K);
        float *q = s->qkv + (int64_t)j * width;
        rope(q + head * D, s->cos + (int64_t)j * D, s->sin + (int64_t)j * D, D);
        if (head >= H) {
            int kh = head - H;
            int64_t slot = ((s->row[j] * K + kh) * s->S + s->pos[j]) * D;
            memcpy(s->k_cache + slot, q + head * D, sizeof(float) * D);
            memcpy(s->v_cache + slot, q + (H + K + kh) * D, sizeof(float) * D);
        }
    }
}

static void attention_run(void *p, int t, int nt) {
    step *s = p;
    const decoder *d = s->d;
    int H = d->n_heads, K = d->n_kv, D = d->head_dim, G = H / K, width = (H + 2 * K) * D;
    float scale = 1.0f / sqrtf((float)D);
    float *sc = s->scores + (int64_t)t * s->S;
    int lo, hi;
    share(s->n * H, 1, t, nt, &lo, &hi);
    for (int u = lo; u < hi; u++) {
        int j = u / H, head = u % H, kh = head / G, len = (int)s->pos[j] + 1;
        const float *q = s->qkv + (int64_t)j * width + head * D;
        const float *keys = s->k_cache + (s->row[j] * K + kh) * s->S * D;
        const float *values = s->v_cache + (s->row[j] * K + kh) * s->S * D;
        float top = -INFINITY;
        for (int k = 0; k < len; k++) {
            sc[k] = dot(q, keys + (int64_t)k * D, D) * scale;
            top = fmaxf(top, sc[k]);
        }
        float total = exp_shifted(sc, len, top);
        float *out = s->att + (int64_t)j * H * D + head * D;
        memset(out, 0, sizeof(float) * D);
        for (int k = 0; k < len; k++) axpy(sc[k] / total, values + (int64_t)k * D, out, D);
    }
}

static void o_run(void *p, int t, int nt) { /* x += att @ o.T */
    step *s = p;
    share_product(s, t, nt, &s->lw->o, s->att, s->x, s->d->dim, ADD);
}

static void gate_up_run(void *p, int t, int nt) { /* each thread owns the same columns of gate and up */
    step *s = p;
    const qmatrix *m = &s->lw->gate_up;
    int I = s->d->inter, dim = s->d->dim, lo, hi;
    share(I, Q4_ROWS, t, nt, &lo, &hi);
    qinput xi = thread_input(&s->buf, t, s->n, s->width, dim);
    product(m, lo, hi, s->xn, dim, &xi, s->gu, 2 * I, STORE, 0);
    product(m, I + lo, I + hi, s->xn, dim, &xi, s->gu, 2 * I, STORE, 1);
    for (int j = 0; j < s->n; j++) {
        const float *g = s->gu + (int64_t)j * 2 * I;
        swiglu(g + lo, g + I + lo, s->h + (int64_t)j * I + lo, hi - lo);
    }
}

static void down_run(void *p, int t, int nt) { /* x += h @ down.T */
    step *s = p;
    share_product(s, t, nt, &s->lw->down, s->h, s->x, s->d->dim, ADD);
}

static void final_norm_run(void *p, int t, int nt) { norm_run(p, t, nt, ((step *)p)->d->final_norm); }

/* Run n tokens through every layer: x [n, dim] holds their embeddings and is left holding the residual stream;
 * out [n, dim] gets the final norm of it. Token j goes to cache row row[j] at slot pos[j] and attends to that
 * row's slots 0..pos[j], so every token's key and value must be written (here or earlier) before it is read:
 * the tokens of one row come in order of position. Returns 0, or -1 if scratch memory could not be had. */
int camelid_decoder_forward(const decoder *d, int n, float *x, const int64_t *row, const int64_t *pos,
                            const float *cos, const float *sin, float *const *k_caches, float *const *v_caches,
                            int S, float *out, int threads) {
    int H = d->n_heads, K = d->n_kv, D = d->head_dim, I = d->inter, dim = d->dim;
    if (D > 512) return -2;
    pthread_mutex_lock(&call_lock);
    int nt = pool_grow(threads);
    size_t floats = (size_t)n * (dim + (H + 2 * K) * D + H * D + 3 * I) + (size_t)nt * S;
    int width = dim > H * D ? dim : H * D;
    width = width > I ? width : I;
    step s = {.d = d, .n = n, .x = x, .row = row, .pos = pos, .cos = cos, .sin = sin, .S = S, .width = width};
    float *scratch = malloc(sizeof(float) * floats);
    if (!scratch || alloc_buffers(&s.buf, nt, n, width) != 0) {
        free(scratch);
        pthread_mutex_unlock(&call_lock);
        return -1;
    }
    s.xn = scratch;
    s.qkv = s.xn + (size_t)n * dim;
    s.att = s.qkv + (size_t)n * (H + 2 * K) * D;
    s.gu = s.att + (size_t)n * H * D;
    s.h = s.gu + (size_t)n * 2 * I;
    s.scores = s.h + (size_t)n * I;
    for (int l = 0; l < d->n_layers; l++) {
        s.lw = &d->layers[l];
        s.k_cache = k_caches[l];
        s.v_cache = v_caches[l];
        parallel(attn_norm_run, &s, nt);
        parallel(qkv_run, &s, nt);
        parallel(rope_store_run, &s, nt);
        parallel(attention_run, &s, nt);
        parallel(o_run, &s, nt);
        parallel(mlp_norm_run, &s, nt);
        parallel(gate_up_run, &s, nt);
        parallel(down_run, &s, nt);
    }
    s.xn = out;
    parallel(final_norm_run, &s, nt);
    free(scratch);
    free_buffers(&s.buf);
    pthread_mutex_unlock(&call_lock);
    return 0;
}

/* The structs' sizes, so that the Python side can check its mirror of them. */
int camelid_sizeof_layer(void) { return (int)sizeof(layer_weights); }
int camelid_sizeof_decoder(void) { return (int)sizeof(decoder); }
int camelid_offset_pairs(void) { return (int)offsetof(qmatrix, pairs); }
int camelid_scale_block(void) { return SCALE_BLOCK; }
int camelid_q4_block(void) { return Q4_BLOCK; }
int camelid_q4_rows(void) { return Q4_ROWS; }
int camelid_panel_min(void) { return PANEL_MIN; }
