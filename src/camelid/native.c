/* camelid's CPU kernels for quantized inference: int8 weights; float32 activations, rounded to int16 per row
 * inside the products.
 *
 * At batch 1 a small model's decode reads every weight once per token and does little else, so what counts is
 * how many bytes the weights take and how little happens between the products. PyTorch spends about as long
 * dispatching a decoder layer's ~10 small operations as it does in its products; here a whole forward pass over
 * the decoder's layers is one call.
 *
 * Weights are int8 with a float scale per block of SCALE_BLOCK weights along each row (as llama.cpp's Q8_0 has
 * per 32): one outlier weight coarsens only its own block's grid. Activations are rounded to int16 per row.
 *
 * Built by camelid.native with the machine's C compiler (-O3 -march=native) on first use. Work is split over a
 * small pool of threads that spin between the steps of one call and sleep between calls. Every entry point
 * takes a lock: calls from several Python threads run one after another.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
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

/* ---- int8 x int16 products -------------------------------------------------------------------------------- */

/* The products are integer dot products: each input row is rounded to int16 with its own scale (max |x| /
 * 32767, a relative error of at most 1/65534 of the row's largest element, far below the weights' 1/254), and
 * int8 x int16 pairs are multiplied and summed exactly (vpmaddwd), half the instructions per weight of
 * widening the weights to float. Each block's exact int32 sum is scaled by the block's scale in float32. */

#define SCALE_BLOCK 64 /* weights per scale along a row; the last block of a row may be shorter */

typedef struct {
    const int8_t *w; /* [out, in] */
    const float *scale; /* [out, blocks], blocks = ceil(in / SCALE_BLOCK) */
    const float *bias; /* [out] or NULL */
    int out, in;
} qmatrix;

static inline int blocks_of(int in) { return (in + SCALE_BLOCK - 1) / SCALE_BLOCK; }

typedef struct { /* n input rows as int16, [n, in], and their scales */
    int16_t *q;
    float *scale;
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

/* y[c * ldy + r] (=|+=) x_scale[c] * sum over blocks k of w_scale[r, k] * dot(w[r, k], xq[c, k]) + bias[r], for
 * R weight rows from r0 and C input rows from c0. */
static inline __attribute__((always_inline)) void tile(const qmatrix *m, int r0, int R, const qinput *xi, int c0,
                                                       int C, float *y, int ldy, int mode) {
    const int in = m->in, nb = blocks_of(in);
    const int8_t *w = m->w + (int64_t)r0 * in;
    const float *ws = m->scale + (int64_t)r0 * nb;
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

#define X_BLOCK 64 /* input rows per pass over the weights: 64 x 4K int16 stay in L2 */

/* Rows [lo, hi) of y = x @ w.T: the weights are read once per X_BLOCK input rows. */
static void product_rows(const qmatrix *m, int lo, int hi, const qinput *xi, float *y, int ldy, int mode) {
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

/* Each thread rounds the whole input itself, into its own buffer (n x in: little next to n x in x out). */
typedef struct {
    int16_t *q;
    float *scale;
} thread_buffers;

static qinput thread_input(const thread_buffers *b, int t, int n, int width, int in) {
    qinput xi = {b->q + (int64_t)t * n * width, b->scale + (int64_t)t * n, n, in};
    return xi;
}

static int alloc_buffers(thread_buffers *b, int nt, int n, int width) {
    b->q = malloc(sizeof(int16_t) * (size_t)nt * n * width);
    b->scale = malloc(sizeof(float) * (size_t)nt * n);
    if (b->q && b->scale) return 0;
    free(b->q);
    free(b->scale);
    return -1;
}

static void free_buffers(thread_buffers *b) {
    free(b->q);
    free(b->scale);
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
    quantize_input(a->x, a->m->in, &xi);
    share(a->m->out, 4, t, nt, &lo, &hi);
    product_rows(a->m, lo, hi, &xi, a->y, a->m->out, STORE);
}

/* y [n, out] = x [n, in] @ w.T * scale (+ bias), on `threads` threads. Returns 0, or -1 without memory. */
int camelid_linear(const int8_t *w, const float *scale, const float *bias, int out, int in, const float *x, int n,
                   float *y, int threads) {
    qmatrix m = {w, scale, bias, out, in};
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

static void quantize_run(void *p, int t, int nt) {
    quantize_task *a = p;
    int lo, hi, nb = blocks_of(a->in);
    share(a->out, 1, t, nt, &lo, &hi);
    for (int r = lo; r < hi; r++) {
        for (int k = 0; k < nb; k++) {
            int start = k * SCALE_BLOCK, n = start + SCALE_BLOCK < a->in ? SCALE_BLOCK : a->in - start;
            const float *row = a->w + (int64_t)r * a->in + start;
            int8_t *q = a->q + (int64_t)r * a->in + start;
            float top = max_abs(row, n), s = top > 0 ? fmaxf(top / 127, FLT_MIN) : 1.0f, inv = 1.0f / s;
            a->scale[(int64_t)r * nb + k] = s;
            int i = 0;
#ifdef __AVX2__
            __m256 vinv = _mm256_set1_ps(inv);
            for (; i + 32 <= n; i += 32) {
                __m256i v[4];
                for (int j = 0; j < 4; j++) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + i + 8 * j), vinv));
                /* two packs leave 4-byte groups in the order a0 b0 c0 d0 | a1 b1 c1 d1: put them back in order */
                __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
                bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256((__m256i *)(q + i), bytes);
            }
#endif
            for (; i < n; i++) q[i] = (int8_t)lrintf(row[i] * inv);
        }
    }
}

void camelid_quantize_rows(const float *w, int out, int in, int8_t *q, float *scale, int threads) {
    quantize_task a = {w, out, in, q, scale};
    pthread_mutex_lock(&call_lock);
    parallel(quantize_run, &a, pool_grow(threads));
    pthread_mutex_unlock(&call_lock);
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
    share(m->out, 4, t, nt, &lo, &hi);
    qinput xi = thread_input(&s->buf, t, s->n, s->width, m->in);
    quantize_input(x, m->in, &xi);
    product_rows(m, lo, hi, &xi, y, ldy, mode);
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
    share(I, 4, t, nt, &lo, &hi);
    qinput xi = thread_input(&s->buf, t, s->n, s->width, dim);
    quantize_input(s->xn, dim, &xi);
    product_rows(m, lo, hi, &xi, s->gu, 2 * I, STORE);
    product_rows(m, I + lo, I + hi, &xi, s->gu, 2 * I, STORE);
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
int camelid_scale_block(void) { return SCALE_BLOCK; }
