// ggml's CPU kernels timed the way `bench-peers` times lowbit and candle: same shapes, same generated data,
// warm loops, median of calls. Built against a ggml from outside the tracked tree by `build.sh` (next to this
// file); `bench-peers --ggml PATH` runs it as a child process, one measurement per call, interleaved with
// lowbit and candle.
//
//   ggml-kernels bufts                                   names of the CPU's extra buffer types, one per line
//   ggml-kernels quantize   TYPE OUT IN BUDGET_MS        one thread; the CPU backend's `from_float`
//   ggml-kernels dequantize TYPE OUT IN BUDGET_MS        one thread; the type's `to_float`
//   ggml-kernels mul_mat    TYPE OUT IN M THREADS BUFT BUDGET_MS
//                                                        y[M×OUT] = x[M×IN]·Wᵀ through ggml_backend_graph_compute
//                                                        on a persistent thread pool; BUFT `CPU` or an extra
//                                                        buffer type (`CPU_REPACK`, `AMX`): the weight is set
//                                                        through it, so it is repacked as llama.cpp does at load
//
// TYPE: q8_0 q4_0 q4_1 iq4_nl. Prints `seconds S` (the median) on success; exit 2 with `unsupported: …` when
// the buffer type does not take the weight or the op.

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// Median seconds of `f`: one warm-up call, then calls until `budget` seconds have passed (at least 3, at most
// 200), as bench-peers' `time`.
typedef void (*bench_fn)(void *);
static double median_time(double budget, bench_fn f, void *arg) {
    double t[200];
    int n = 0;
    f(arg);
    double start = now();
    while (n < 3 || (now() - start < budget && n < 200)) {
        double s = now();
        f(arg);
        t[n++] = now() - s;
    }
    qsort(t, (size_t)n, sizeof t[0], cmp_double);
    return t[n / 2];
}

// `lowbit_testkit::synthetic::peers_data`, bench-peers' data: a sum of four xorshift uniforms, scaled per row.
static float *gen_data(size_t n, size_t cols, uint64_t seed) {
    float *v = malloc(n * sizeof(float));
    uint64_t s = seed | 1;
    for (size_t i = 0; i < n; i++) {
        float u = 0.0f;
        for (int k = 0; k < 4; k++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            u += (float)(s >> 40) / (float)(1ull << 24) - 0.5f;
        }
        v[i] = u * 0.02f * (1.0f + (float)((i / cols) % 5) * 0.3f);
    }
    return v;
}

static enum ggml_type parse_type(const char *s) {
    if (!strcmp(s, "q8_0")) return GGML_TYPE_Q8_0;
    if (!strcmp(s, "q4_0")) return GGML_TYPE_Q4_0;
    if (!strcmp(s, "q4_1")) return GGML_TYPE_Q4_1;
    if (!strcmp(s, "iq4_nl")) return GGML_TYPE_IQ4_NL;
    fprintf(stderr, "unknown type %s (expected q8_0, q4_0, q4_1 or iq4_nl)\n", s);
    exit(1);
}

static ggml_backend_buffer_type_t *extra_bufts(void) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_dev_get_extra_bufts_t get =
        (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    return get ? get(dev) : NULL;
}

struct convert {
    ggml_from_float_t from;
    ggml_to_float_t to;
    const float *f32_in;
    float *f32_out;
    void *q;
    int64_t n;
};
static void run_from(void *a) {
    struct convert *c = a;
    c->from(c->f32_in, c->q, c->n);
}
static void run_to(void *a) {
    struct convert *c = a;
    c->to(c->q, c->f32_out, c->n);
}

struct graph_run {
    ggml_backend_t backend;
    struct ggml_cgraph *graph;
};
static void run_graph(void *a) {
    struct graph_run *g = a;
    if (ggml_backend_graph_compute(g->backend, g->graph) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "graph compute failed\n");
        exit(1);
    }
}

static int convert_main(int argc, char **argv, int quantize) {
    if (argc != 6) return 1;
    enum ggml_type type = parse_type(argv[2]);
    int64_t out = atoll(argv[3]), in = atoll(argv[4]);
    double budget = atof(argv[5]) * 1e-3;
    int64_t n = out * in;
    struct convert c = {0};
    c.from = ggml_get_type_traits_cpu(type)->from_float;
    c.to = ggml_get_type_traits(type)->to_float;
    float *w = gen_data((size_t)n, (size_t)in, 1);
    c.f32_in = w;
    c.f32_out = malloc((size_t)n * sizeof(float));
    c.q = malloc(ggml_row_size(type, n));
    c.n = n;
    memset(c.f32_out, 0, (size_t)n * sizeof(float));
    ggml_quantize_chunk(type, w, c.q, 0, out, in, NULL);
    if (quantize && !c.from) {
        printf("unsupported: no CPU from_float for %s\n", argv[2]);
        return 2;
    }
    printf("seconds %.9f\n", median_time(budget, quantize ? run_from : run_to, &c));
    return 0;
}

static int mul_mat_main(int argc, char **argv) {
    if (argc != 9) return 1;
    enum ggml_type type = parse_type(argv[2]);
    int64_t out = atoll(argv[3]), in = atoll(argv[4]), m = atoll(argv[5]);
    int threads = atoi(argv[6]);
    const char *buft_name = argv[7];
    double budget = atof(argv[8]) * 1e-3;

    ggml_backend_t backend = ggml_backend_cpu_init();
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
    struct ggml_threadpool *tp = ggml_threadpool_new(&tpp);
    ggml_backend_cpu_set_n_threads(backend, threads);
    ggml_backend_cpu_set_threadpool(backend, tp);

    ggml_backend_buffer_type_t buft = NULL;
    if (!strcmp(buft_name, "CPU")) {
        buft = ggml_backend_get_default_buffer_type(backend);
    } else {
        ggml_backend_buffer_type_t *extra = extra_bufts();
        for (; extra && *extra; extra++) {
            if (!strcmp(ggml_backend_buft_name(*extra), buft_name)) buft = *extra;
        }
        if (!buft) {
            printf("unsupported: no buffer type %s in this build\n", buft_name);
            return 2;
        }
    }

    struct ggml_init_params wp = {ggml_tensor_overhead() * 2, NULL, true};
    struct ggml_context *wctx = ggml_init(wp);
    struct ggml_tensor *w = ggml_new_tensor_2d(wctx, type, in, out);
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft);
    if (!wbuf) {
        printf("unsupported: %s did not allocate the weight\n", buft_name);
        return 2;
    }
    ggml_backend_buffer_set_usage(wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);

    struct ggml_init_params cp = {ggml_tensor_overhead() * 8 + ggml_graph_overhead(), NULL, true};
    struct ggml_context *ctx = ggml_init(cp);
    struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, in, m);
    struct ggml_tensor *y = ggml_mul_mat(ctx, w, x);
    struct ggml_cgraph *graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, y);
    ggml_backend_buffer_t cbuf = ggml_backend_alloc_ctx_tensors(ctx, backend);

    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    if (!ggml_backend_dev_supports_op(dev, y)) {
        printf("unsupported: %s does not run mul_mat on %s\n", buft_name, argv[2]);
        return 2;
    }
    float *wf = gen_data((size_t)(out * in), (size_t)in, 1);
    size_t wbytes = ggml_row_size(type, out * in);
    void *wq = malloc(wbytes);
    ggml_quantize_chunk(type, wf, wq, 0, out, in, NULL);
    ggml_backend_tensor_set(w, wq, 0, wbytes);
    float *xf = gen_data((size_t)(m * in), (size_t)in, 9);
    ggml_backend_tensor_set(x, xf, 0, (size_t)(m * in) * sizeof(float));

    struct graph_run g = {backend, graph};
    printf("seconds %.9f\n", median_time(budget, run_graph, &g));

    ggml_backend_buffer_free(cbuf);
    ggml_backend_buffer_free(wbuf);
    ggml_free(ctx);
    ggml_free(wctx);
    ggml_backend_free(backend);
    ggml_threadpool_free(tp);
    return 0;
}

int main(int argc, char **argv) {
    int rc = 1;
    ggml_cpu_init();
    if (argc >= 2 && !strcmp(argv[1], "bufts")) {
        for (ggml_backend_buffer_type_t *b = extra_bufts(); b && *b; b++) printf("%s\n", ggml_backend_buft_name(*b));
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "quantize")) rc = convert_main(argc, argv, 1);
    if (argc >= 2 && !strcmp(argv[1], "dequantize")) rc = convert_main(argc, argv, 0);
    if (argc >= 2 && !strcmp(argv[1], "mul_mat")) rc = mul_mat_main(argc, argv);
    if (rc == 1) {
        fprintf(stderr,
                "usage: ggml-kernels bufts | quantize|dequantize TYPE OUT IN BUDGET_MS | mul_mat TYPE OUT IN M "
                "THREADS BUFT BUDGET_MS\n");
    }
    return rc;
}
