/*
 * Native loops of the qatcore-cpu fake-quant kernel.
 *
 * Each function works on a dense tensor seen in memory order as (outer,
 * channels, inner), with one float32 scale and one int32 or float32 zero
 * point per channel (one channel for per-tensor quantization). It splits
 * the tensor into the parts the caller asks for, runs them on the calling
 * thread and a pool of POSIX threads, and releases the GIL meanwhile.
 *
 * The qparams are prepared as qatcore.prepare_qparams prepares them: the
 * reciprocal scale in float32, the zero point rounded half to even and
 * clamped. A scale that is not finite and positive is counted, and its
 * channel is skipped, so that the caller raises qatcore.check_qparams's
 * error. Then the arithmetic is the reference kernel's, operation for
 * operation, in the input's dtype (float32 or float64):
 * code = nearbyint(x * inv_scale) + zero_point,
 * clamped = clamp(code, quant_min, quant_max) with NaN passing through,
 * inside = clamped == code, out = (clamped - zero_point) * scale, and
 * grad_input = grad_output * inside. The build turns off floating-point
 * contraction, so no product and sum fuse into one rounding, and every
 * element gets the same bits as from the ATen ops.
 *
 * Pointers arrive as Python integers (tensor.data_ptr()). The Python side
 * checks dtypes, shapes and layouts before it calls in.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>

/* GCC and Clang on x86-64 Linux build an AVX2 clone of each loop next to
 * the baseline one and pick it at load time on CPUs that have AVX2. The
 * AVX2 clone rounds eight floats per instruction; the baseline calls
 * nearbyint per element. Both round half to even, as torch.round does. */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define QATCORE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define QATCORE_CLONES
#endif

enum { KIND_FLOAT32 = 0, KIND_FLOAT64 = 1 };

/* clamp(code, lo, hi) as torch.clamp computes it: a NaN code stays NaN. */
#define CLAMP(code, lo, hi) ((code) < (lo) ? (lo) : ((code) > (hi) ? (hi) : (code)))

#define DEFINE_RUNS(T, SUFFIX, ROUND)                                                             \
    QATCORE_CLONES static void forward_run_##SUFFIX(                                              \
        const T *x, T *out, unsigned char *inside, int64_t n, T scale, T inv_scale, T zero_point, \
        T lo, T hi) {                                                                              \
        if (inside) {                                                                              \
            for (int64_t i = 0; i < n; i++) {                                                      \
                T code = ROUND(x[i] * inv_scale) + zero_point;                                     \
                T clamped = CLAMP(code, lo, hi);                                                   \
                inside[i] = clamped == code;                                                       \
                out[i] = (clamped - zero_point) * scale;                                           \
            }                                                                                      \
        } else {                                                                                   \
            for (int64_t i = 0; i < n; i++) {                                                      \
                T code = ROUND(x[i] * inv_scale) + zero_point;                                     \
                T clamped = CLAMP(code, lo, hi);                                                   \
                out[i] = (clamped - zero_point) * scale;                                           \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    QATCORE_CLONES static void input_gradient_run_##SUFFIX(                                       \
        const T *grad, const T *x, T *out, int64_t n, T inv_scale, T zero_point, T lo, T hi) {    \
        for (int64_t i = 0; i < n; i++) {                                                          \
            T code = ROUND(x[i] * inv_scale) + zero_point;                                         \
            T clamped = CLAMP(code, lo, hi);                                                       \
            T inside = clamped == code ? (T)1 : (T)0; /* a select, which vectorizes */             \
            out[i] = grad[i] * inside;                                                             \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    QATCORE_CLONES static void masked_gradient_run_##SUFFIX(                                      \
        const T *grad, const unsigned char *inside, T *out, int64_t n) {                           \
        for (int64_t i = 0; i < n; i++) {                                                          \
            out[i] = grad[i] * (T)inside[i];                                                       \
        }                                                                                          \
    }

DEFINE_RUNS(float, f32, nearbyintf)
DEFINE_RUNS(double, f64, nearbyint)


enum { ZERO_POINT_FLOAT32 = 0, ZERO_POINT_INT32 = 1 };

/* One channel's qparams as the reference prepares them: the float32 scale,
 * its float32 reciprocal, and the zero point converted to float32, rounded
 * half to even and clamped to [lo, hi]. */
typedef struct {
    float scale, inv_scale, zero_point;
    int valid; /* the scale is finite and > 0, as qatcore.check_qparams requires */
} ChannelQparams;

static ChannelQparams channel_qparams(const float *scales, const void *zero_points,
                                      int zero_point_kind, int64_t channel, float lo, float hi) {
    ChannelQparams q;
    q.scale = scales[channel];
    q.inv_scale = 1.0f / q.scale;
    float zero_point = zero_point_kind == ZERO_POINT_INT32
                           ? (float)((const int32_t *)zero_points)[channel]
                           : ((const float *)zero_points)[channel];
    zero_point = nearbyintf(zero_point);
    q.zero_point = CLAMP(zero_point, lo, hi);
    q.valid = q.scale > 0.0f && q.scale <= FLT_MAX;
    return q;
}

/* The arguments every per-channel loop shares. */
typedef struct {
    int kind;
    int64_t channels, inner, start, stop;
    const float *scales;
    const void *zero_points;
    int zero_point_kind;
    /* The range in double, exact for every integer range that the float64
     * loops take. The float32 loops and the zero point use it in float32,
     * as torch.clamp on a float32 tensor does. */
    double quant_min, quant_max;
} Layout;

static int parse_layout(Layout *layout, int kind, long long channels, long long inner,
                        unsigned long long scales, unsigned long long zero_points,
                        int zero_point_kind, double quant_min, double quant_max) {
    if (kind != KIND_FLOAT32 && kind != KIND_FLOAT64) {
        PyErr_Format(PyExc_ValueError, "unknown dtype kind %d; expected 0 (float32) or 1 (float64)",
                     kind);
        return -1;
    }
    if (zero_point_kind != ZERO_POINT_FLOAT32 && zero_point_kind != ZERO_POINT_INT32) {
        PyErr_Format(PyExc_ValueError,
                     "unknown zero-point kind %d; expected 0 (float32) or 1 (int32)",
                     zero_point_kind);
        return -1;
    }
    if (channels < 1 || inner < 1) {
        PyErr_Format(PyExc_ValueError, "invalid layout: channels=%lld, inner=%lld", channels,
                     inner);
        return -1;
    }
    layout->kind = kind;
    layout->channels = channels;
    layout->inner = inner;
    layout->start = 0;
    layout->stop = 0;
    layout->scales = (const float *)(uintptr_t)scales;
    layout->zero_points = (const void *)(uintptr_t)zero_points;
    layout->zero_point_kind = zero_point_kind;
    layout->quant_min = quant_min;
    layout->quant_max = quant_max;
    return 0;
}

/* Call body(first, count, q) for each run of [start, stop) that lies in one
 * channel, with that channel's qparams, and return how many runs met an
 * invalid scale. Those runs are skipped, and the caller raises. */
#define FOR_EACH_CHANNEL_RUN(layout, body)                                               \
    do {                                                                                 \
        int64_t first_ = (layout).start;                                                 \
        while (first_ < (layout).stop) {                                                 \
            int64_t row_ = first_ / (layout).inner;                                      \
            int64_t end_ = (row_ + 1) * (layout).inner;                                  \
            if (end_ > (layout).stop) end_ = (layout).stop;                              \
            ChannelQparams q_ =                                                          \
                channel_qparams((layout).scales, (layout).zero_points,                   \
                                (layout).zero_point_kind, row_ % (layout).channels,      \
                                (float)(layout).quant_min, (float)(layout).quant_max);   \
            if (q_.valid) {                                                              \
                body(first_, end_ - first_, q_);                                         \
            } else {                                                                     \
                invalid_++;                                                              \
            }                                                                            \
            first_ = end_;                                                               \
        }                                                                                \
    } while (0)

/* -- threads ------------------------------------------------------------------------- */

/* One job runs a function over the parts of [0, numel): part i covers
 * [i * step, min((i + 1) * step, numel)). The calling thread and a pool of
 * worker threads take parts until none is left, and the results of the
 * parts are summed. Waking a pool thread through a condition variable
 * costs some microseconds, where a Python thread pool costs tens. */
typedef struct Job Job;
typedef int64_t (*PartFunction)(const Job *job, int part, int64_t start, int64_t stop);

struct Job {
    PartFunction run;
    const void *arguments;
    int64_t numel, step;
    int parts;
};

#define MAX_WORKERS 64

static struct {
    pthread_mutex_t lock;    /* guards every field below */
    pthread_cond_t work;     /* a job has parts to take */
    pthread_cond_t finished; /* the job's last part is done */
    pthread_mutex_t job;     /* one job at a time */
    int workers;
    const Job *current;
    int next_part, unfinished;
    int64_t total;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_MUTEX_INITIALIZER, 0, NULL, 0, 0, 0};

/* Take and run parts of the current job while there are any; pool.lock is held
 * on entry and on return. */
static void take_parts(void) {
    while (pool.current != NULL && pool.next_part < pool.current->parts) {
        const Job *job = pool.current;
        int part = pool.next_part++;
        pthread_mutex_unlock(&pool.lock);
        int64_t start = part * job->step;
        int64_t stop = start + job->step < job->numel ? start + job->step : job->numel;
        int64_t result = job->run(job, part, start, stop);
        pthread_mutex_lock(&pool.lock);
        pool.total += result;
        if (--pool.unfinished == 0) pthread_cond_signal(&pool.finished);
    }
}

static void *worker_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        take_parts();
        pthread_cond_wait(&pool.work, &pool.lock);
    }
    return NULL;
}

/* A forked child has none of the parent's threads, and a lock that one of
 * them held stays held: the child starts with a fresh pool. */
static void reset_pool_in_child(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.finished, NULL);
    pthread_mutex_init(&pool.job, NULL);
    pool.workers = 0;
    pool.current = NULL;
    pool.next_part = pool.unfinished = 0;
    pool.total = 0;
}

/* Start worker threads until there are `count`, at most MAX_WORKERS; pool.lock is held. */
static void start_workers(int count) {
    if (count > MAX_WORKERS) count = MAX_WORKERS;
    while (pool.workers < count) {
        pthread_t thread;
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attributes, worker_main, NULL);
        pthread_attr_destroy(&attributes);
        if (failed) break; /* the caller takes the parts that no worker takes */
        pool.workers++;
    }
}

/* Run `job` and return the sum of its parts' results. Call it without the GIL. */
static int64_t run_job(const Job *job) {
    if (job->parts <= 1) return job->run(job, 0, 0, job->numel);
    pthread_mutex_lock(&pool.job);
    pthread_mutex_lock(&pool.lock);
    start_workers(job->parts - 1);
    pool.current = job;
    pool.next_part = 0;
    pool.unfinished = job->parts;
    pool.total = 0;
    pthread_cond_broadcast(&pool.work);
    take_parts();
    while (pool.unfinished > 0) pthread_cond_wait(&pool.finished, &pool.lock);
    int64_t total = pool.total;
    pool.current = NULL;
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.job);
    return total;
}

/* Check that `parts` parts of `step` elements cover [0, numel), none of them empty
 * but for a single part of an empty tensor. */
static int parse_parts(long long numel, long long step, int parts) {
    int covers = numel >= 0 && step >= 1 && parts >= 1 && (long long)parts * step >= numel;
    int none_empty = parts == 1 || (long long)(parts - 1) * step < numel;
    if (!covers || !none_empty) {
        PyErr_Format(PyExc_ValueError, "invalid parts: numel=%lld, step=%lld, parts=%d", numel,
                     step, parts);
        return -1;
    }
    return 0;
}

/* -- entry points -------------------------------------------------------------------- */

typedef struct {
    Layout layout;
    uintptr_t x, out, inside, grad;
} LoopArguments;

static int64_t forward_part(const Job *job, int part, int64_t start, int64_t stop) {
    (void)part;
    const LoopArguments *arguments = (const LoopArguments *)job->arguments;
    Layout layout = arguments->layout;
    layout.start = start;
    layout.stop = stop;
    int64_t invalid_ = 0;
    unsigned char *mask = (unsigned char *)arguments->inside;
    if (layout.kind == KIND_FLOAT32) {
        const float *xs = (const float *)arguments->x;
        float *outs = (float *)arguments->out;
#define RUN_F32(first, count, q)                                                           \
    forward_run_f32(xs + (first), outs + (first), mask ? mask + (first) : NULL, (count),    \
                    q.scale, q.inv_scale, q.zero_point, (float)layout.quant_min,            \
                    (float)layout.quant_max)
        FOR_EACH_CHANNEL_RUN(layout, RUN_F32);
#undef RUN_F32
    } else {
        const double *xs = (const double *)arguments->x;
        double *outs = (double *)arguments->out;
#define RUN_F64(first, count, q)                                                           \
    forward_run_f64(xs + (first), outs + (first), mask ? mask + (first) : NULL, (count),    \
                    (double)q.scale, (double)q.inv_scale, (double)q.zero_point,             \
                    layout.quant_min, layout.quant_max)
        FOR_EACH_CHANNEL_RUN(layout, RUN_F64);
#undef RUN_F64
    }
    return invalid_;
}

static int64_t input_gradient_part(const Job *job, int part, int64_t start, int64_t stop) {
    (void)part;
    const LoopArguments *arguments = (const LoopArguments *)job->arguments;
    Layout layout = arguments->layout;
    layout.start = start;
    layout.stop = stop;
    int64_t invalid_ = 0;
    if (layout.kind == KIND_FLOAT32) {
        const float *gs = (const float *)arguments->grad;
        const float *xs = (const float *)arguments->x;
        float *outs = (float *)arguments->out;
#define RUN_F32(first, count, q)                                                          \
    input_gradient_run_f32(gs + (first), xs + (first), outs + (first), (count), q.inv_scale, \
                           q.zero_point, (float)layout.quant_min, (float)layout.quant_max)
        FOR_EACH_CHANNEL_RUN(layout, RUN_F32);
#undef RUN_F32
    } else {
        const double *gs = (const double *)arguments->grad;
        const double *xs = (const double *)arguments->x;
        double *outs = (double *)arguments->out;
#define RUN_F64(first, count, q)                                                            \
    input_gradient_run_f64(gs + (first), xs + (first), outs + (first), (count),               \
                           (double)q.inv_scale, (double)q.zero_point, layout.quant_min,         \
                           layout.quant_max)
        FOR_EACH_CHANNEL_RUN(layout, RUN_F64);
#undef RUN_F64
    }
    return invalid_;
}

static int64_t masked_gradient_part(const Job *job, int part, int64_t start, int64_t stop) {
    (void)part;
    const LoopArguments *arguments = (const LoopArguments *)job->arguments;
    const unsigned char *mask = (const unsigned char *)arguments->inside + start;
    if (arguments->layout.kind == KIND_FLOAT32) {
        masked_gradient_run_f32((const float *)arguments->grad + start, mask,
                                (float *)arguments->out + start, stop - start);
    } else {
        masked_gradient_run_f64((const double *)arguments->grad + start, mask,
                                (double *)arguments->out + start, stop - start);
    }
    return 0;
}

static PyObject *native_forward(PyObject *self, PyObject *args) {
    int kind, zero_point_kind, parts;
    long long channels, inner, numel, step;
    unsigned long long x, out, inside, scales, zero_points;
    double quant_min, quant_max;
    if (!PyArg_ParseTuple(args, "iKKKLLLLiKKidd", &kind, &x, &out, &inside, &channels, &inner,
                          &numel, &step, &parts, &scales, &zero_points, &zero_point_kind,
                          &quant_min, &quant_max))
        return NULL;
    LoopArguments arguments = {.x = x, .out = out, .inside = inside};
    if (parse_layout(&arguments.layout, kind, channels, inner, scales, zero_points,
                     zero_point_kind, quant_min, quant_max) < 0 ||
        parse_parts(numel, step, parts) < 0)
        return NULL;
    Job job = {forward_part, &arguments, numel, step, parts};

    int64_t invalid;
    Py_BEGIN_ALLOW_THREADS
    invalid = run_job(&job);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(invalid);
}

static PyObject *native_input_gradient(PyObject *self, PyObject *args) {
    int kind, zero_point_kind, parts;
    long long channels, inner, numel, step;
    unsigned long long grad, x, out, scales, zero_points;
    double quant_min, quant_max;
    if (!PyArg_ParseTuple(args, "iKKKLLLLiKKidd", &kind, &grad, &x, &out, &channels, &inner,
                          &numel, &step, &parts, &scales, &zero_points, &zero_point_kind,
                          &quant_min, &quant_max))
        return NULL;
    LoopArguments arguments = {.x = x, .out = out, .grad = grad};
    if (parse_layout(&arguments.layout, kind, channels, inner, scales, zero_points,
                     zero_point_kind, quant_min, quant_max) < 0 ||
        parse_parts(numel, step, parts) < 0)
        return NULL;
    Job job = {input_gradient_part, &arguments, numel, step, parts};

    int64_t invalid;
    Py_BEGIN_ALLOW_THREADS
    invalid = run_job(&job);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(invalid);
}

static PyObject *native_masked_gradient(PyObject *self, PyObject *args) {
    int kind, parts;
    long long numel, step;
    unsigned long long grad, inside, out;
    if (!PyArg_ParseTuple(args, "iKKKLLi", &kind, &grad, &inside, &out, &numel, &step, &parts))
        return NULL;
    if (kind != KIND_FLOAT32 && kind != KIND_FLOAT64) {
        PyErr_Format(PyExc_ValueError, "unknown dtype kind %d; expected 0 (float32) or 1 (float64)",
                     kind);
        return NULL;
    }
    if (parse_parts(numel, step, parts) < 0) return NULL;
    LoopArguments arguments = {.grad = grad, .inside = inside, .out = out};
    arguments.layout.kind = kind;
    Job job = {masked_gradient_part, &arguments, numel, step, parts};

    Py_BEGIN_ALLOW_THREADS
    run_job(&job);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* -- observing ----------------------------------------------------------------------- */

/* Fold the finite values of x[0, n) into *lo and *hi, and return 1 when one
 * was NaN or infinite. Sixteen independent lanes, each a min, a max and a
 * flag, keep the loop free of branches, so that the compiler vectorizes it.
 * A non-finite value enters a lane as +inf for the min and -inf for the
 * max, which changes neither. */
#define RANGE_LANES 16
QATCORE_CLONES static int range_run_f32(const float *x, int64_t n, float *lo, float *hi) {
    float lows[RANGE_LANES], highs[RANGE_LANES];
    int32_t bad[RANGE_LANES];
    for (int k = 0; k < RANGE_LANES; k++) {
        lows[k] = *lo;
        highs[k] = *hi;
        bad[k] = 0;
    }
    int64_t i = 0;
    for (; i + RANGE_LANES <= n; i += RANGE_LANES) {
        for (int k = 0; k < RANGE_LANES; k++) {
            float v = x[i + k];
            int32_t finite = fabsf(v) <= FLT_MAX;
            float low = finite ? v : INFINITY;
            float high = finite ? v : -INFINITY;
            lows[k] = low < lows[k] ? low : lows[k];
            highs[k] = high > highs[k] ? high : highs[k];
            bad[k] |= !finite;
        }
    }
    for (; i < n; i++) {
        float v = x[i];
        int32_t finite = fabsf(v) <= FLT_MAX;
        if (finite) {
            lows[0] = v < lows[0] ? v : lows[0];
            highs[0] = v > highs[0] ? v : highs[0];
        }
        bad[0] |= !finite;
    }
    int any_bad = 0;
    for (int k = 0; k < RANGE_LANES; k++) {
        *lo = lows[k] < *lo ? lows[k] : *lo;
        *hi = highs[k] > *hi ? highs[k] : *hi;
        any_bad |= bad[k];
    }
    return any_bad;
}

typedef struct {
    uintptr_t x, lows, highs;
    int64_t channels, inner;
} RangeArguments;

/* Fold part `part` of x into row `part` of the per-channel lows and highs. */
static int64_t finite_range_part(const Job *job, int part, int64_t start, int64_t stop) {
    const RangeArguments *arguments = (const RangeArguments *)job->arguments;
    const float *xs = (const float *)arguments->x;
    float *lo = (float *)arguments->lows + (int64_t)part * arguments->channels;
    float *hi = (float *)arguments->highs + (int64_t)part * arguments->channels;
    int any_bad = 0;
    int64_t first = start;
    while (first < stop) {
        int64_t row = first / arguments->inner;
        int64_t end = (row + 1) * arguments->inner;
        if (end > stop) end = stop;
        int64_t channel = row % arguments->channels;
        any_bad |= range_run_f32(xs + first, end - first, lo + channel, hi + channel);
        first = end;
    }
    return any_bad;
}

static PyObject *native_finite_range(PyObject *self, PyObject *args) {
    long long channels, inner, numel, step;
    int parts;
    unsigned long long x, lows, highs;
    if (!PyArg_ParseTuple(args, "KLLLLiKK", &x, &channels, &inner, &numel, &step, &parts, &lows,
                          &highs))
        return NULL;
    if (channels < 1 || inner < 1) {
        PyErr_Format(PyExc_ValueError, "invalid layout: channels=%lld, inner=%lld", channels,
                     inner);
        return NULL;
    }
    if (parse_parts(numel, step, parts) < 0) return NULL;
    RangeArguments arguments = {x, lows, highs, channels, inner};
    Job job = {finite_range_part, &arguments, numel, step, parts};

    int64_t any_bad;
    Py_BEGIN_ALLOW_THREADS
    any_bad = run_job(&job);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(any_bad != 0);
}

/* torch.minimum and torch.maximum of two values that are not NaN. */
static float minimum_f32(float a, float b) { return b < a ? b : a; }
static float maximum_f32(float a, float b) { return b > a ? b : a; }

/* qatcore's _power_of_two: round a scale up to a power of two, at most 2**127. */
static float power_of_two_f32(float scale) {
    int exponent;
    float mantissa = frexpf(scale, &exponent);
    float rounded = mantissa == 0.5f ? scale : ldexpf(1.0f, exponent);
    float limit = ldexpf(1.0f, 127);
    return rounded > limit ? limit : rounded;
}

typedef struct {
    int moving_average, symmetric, is_signed, power_of_two;
    float averaging_constant, quant_min, quant_max;
} ObserverRule;

/* One channel's observer update and qparams, in float32, as RangeObserver.forward,
 * the observer's update and qatcore.qparams_from_min_max compute them with ATen. */
static void observe_channel(const ObserverRule *rule, float batch_min, float batch_max,
                            float *min_val, float *max_val, float *scale_out,
                            int32_t *zero_point_out) {
    float low = *min_val, high = *max_val;
    if (batch_min <= batch_max) {
        if (rule->moving_average) {
            int observed = low <= high;
            float moved_min = low + rule->averaging_constant * (batch_min - low);
            float moved_max = high + rule->averaging_constant * (batch_max - high);
            low = observed ? moved_min : batch_min;
            high = observed ? moved_max : batch_max;
        } else {
            low = minimum_f32(low, batch_min);
            high = maximum_f32(high, batch_max);
        }
    }
    *min_val = low;
    *max_val = high;

    float min_neg = minimum_f32(low, 0.0f);
    float max_pos = maximum_f32(high, 0.0f);
    float levels = rule->quant_max - rule->quant_min;
    float scale, zero_point;
    if (rule->symmetric) {
        float amax = maximum_f32(-min_neg, max_pos);
        scale = amax / (float)((double)levels / 2.0);
        zero_point = rule->is_signed ? 0.0f
                                     : (float)(((int64_t)rule->quant_min + (int64_t)rule->quant_max + 1) / 2);
    } else {
        scale = (max_pos - min_neg) / levels;
        if (!(fabsf(scale) <= FLT_MAX)) scale = max_pos / levels - min_neg / levels;
        scale = scale < FLT_EPSILON ? FLT_EPSILON : scale;
        if (rule->power_of_two) scale = power_of_two_f32(scale);
        zero_point = rule->quant_min - nearbyintf(min_neg / scale);
        zero_point = CLAMP(zero_point, rule->quant_min, rule->quant_max);
    }
    scale = scale < FLT_EPSILON ? FLT_EPSILON : scale;
    if (rule->power_of_two) scale = power_of_two_f32(scale);

    if (!(low <= high)) {
        scale = 1.0f;
        zero_point = 0.0f;
    }
    *scale_out = scale;
    *zero_point_out = (int32_t)zero_point;
}

static PyObject *native_observe(PyObject *self, PyObject *args) {
    long long channels, parts;
    unsigned long long lows, highs, min_val, max_val, scale, zero_point;
    ObserverRule rule;
    double averaging_constant, quant_min, quant_max;
    if (!PyArg_ParseTuple(args, "KKLLKKKKiidiidd", &lows, &highs, &channels, &parts, &min_val,
                          &max_val, &scale, &zero_point, &rule.moving_average, &rule.symmetric,
                          &averaging_constant, &rule.is_signed, &rule.power_of_two, &quant_min,
                          &quant_max))
        return NULL;
    if (channels < 1 || parts < 1) {
        PyErr_Format(PyExc_ValueError, "invalid sizes: channels=%lld, parts=%lld", channels, parts);
        return NULL;
    }
    rule.averaging_constant = (float)averaging_constant;
    rule.quant_min = (float)quant_min;
    rule.quant_max = (float)quant_max;

    const float *lo = (const float *)(uintptr_t)lows;
    const float *hi = (const float *)(uintptr_t)highs;
    for (int64_t c = 0; c < channels; c++) {
        float batch_min = lo[c], batch_max = hi[c];
        for (int64_t part = 1; part < parts; part++) {
            batch_min = minimum_f32(batch_min, lo[part * channels + c]);
            batch_max = maximum_f32(batch_max, hi[part * channels + c]);
        }
        observe_channel(&rule, batch_min, batch_max, (float *)(uintptr_t)min_val + c,
                        (float *)(uintptr_t)max_val + c, (float *)(uintptr_t)scale + c,
                        (int32_t *)(uintptr_t)zero_point + c);
    }
    Py_RETURN_NONE;
}

static PyMethodDef native_methods[] = {
    {"forward", native_forward, METH_VARARGS,
     "forward(kind, x, out, inside, channels, inner, numel, step, parts, scales, zero_points, "
     "zero_point_kind, quant_min, quant_max)\n\nFake-quantize x into out, and the gradient mask "
     "into inside unless it is 0, in parts of step elements run on the pool's threads. Return "
     "how many channel runs met an invalid scale and were skipped."},
    {"input_gradient", native_input_gradient, METH_VARARGS,
     "input_gradient(kind, grad, x, out, channels, inner, numel, step, parts, scales, "
     "zero_points, zero_point_kind, quant_min, quant_max)\n\nWrite grad * inside into out, "
     "recomputing inside from x, in parts. Return how many channel runs met an invalid scale "
     "and were skipped."},
    {"masked_gradient", native_masked_gradient, METH_VARARGS,
     "masked_gradient(kind, grad, inside, out, numel, step, parts)\n\nWrite grad * inside into "
     "out, in parts."},
    {"finite_range", native_finite_range, METH_VARARGS,
     "finite_range(x, channels, inner, numel, step, parts, lows, highs)\n\nFold the finite "
     "values of part i of float32 x into row i of the per-channel float32 minimums lows and "
     "maximums highs, and return whether any value was NaN or infinite."},
    {"observe", native_observe, METH_VARARGS,
     "observe(lows, highs, channels, parts, min_val, max_val, scale, zero_point, moving_average, "
     "symmetric, averaging_constant, signed, power_of_two, quant_min, quant_max)\n\nCombine "
     "parts rows of per-channel batch ranges, update the observer's range and write its float32 "
     "scales and int32 zero points."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "_native",
    "Native loops of the qatcore-cpu fake-quant kernel; qatcore_cpu.native wraps them.", -1,
    native_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    pthread_atfork(NULL, NULL, reset_pool_in_child);
    return PyModule_Create(&native_module);
}
