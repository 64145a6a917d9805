/* Exact heap-allocation meter, loaded into a benchmark child with LD_PRELOAD.
 *
 * Interposes the C allocation functions (malloc, calloc, realloc, reallocarray, free,
 * posix_memalign, aligned_alloc, memalign, valloc, pvalloc), forwards every call to the next
 * definition (glibc's, found with dlsym(RTLD_NEXT, ...)) and keeps two counters:
 *
 *   current  bytes in live blocks whose malloc_usable_size() >= the threshold;
 *   peak     the highest value `current` reached since the last meter_reset_peak().
 *
 * A block is added at allocation and subtracted at free by the same usable size (the size of
 * a live block never changes in glibc; realloc subtracts the old block and adds the new one),
 * so the counters are exact for what they count. The threshold (default 1024 bytes;
 * LONGCTX_ALLOC_METER_THRESHOLD overrides it at start-up) leaves out small-object churn
 * (Python objects, C++ nodes) so that the count is essentially tensor storage: PyTorch's CPU
 * allocator (c10 alloc_cpu) allocates with posix_memalign(64, nbytes), OpenMP (libgomp) and
 * Inductor-generated code with malloc/aligned_alloc, all of which pass through here.
 * Counters are updated with atomics: Inductor/OpenMP worker threads allocate too.
 *
 * Bootstrap: dlsym may call calloc/malloc before the real functions are known; those calls
 * are served from a small static arena, whose blocks are never counted and never handed to
 * glibc's free.
 *
 * Exported for ctypes: meter_current(), meter_peak(), meter_reset_peak() (peak := current),
 * meter_threshold() and meter_alloc_calls() (allocations seen, any size: proves the
 * interposition is live).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);
static void *(*real_memalign)(size_t, size_t);
static void *(*real_valloc)(size_t);
static void *(*real_pvalloc)(size_t);

static atomic_llong current_bytes;
static atomic_llong peak_bytes;
static atomic_llong alloc_calls;
static size_t threshold = 1024;

/* ------------------------------------------------------------------ bootstrap arena */
#define ARENA_SIZE (256 * 1024)
#define ARENA_HDR 64 /* keeps every block 64-byte aligned; holds the block size */
static _Alignas(64) unsigned char arena[ARENA_SIZE];
static atomic_size_t arena_used;
static int initializing;

static inline int in_arena(const void *p) {
    return (const unsigned char *)p >= arena && (const unsigned char *)p < arena + ARENA_SIZE;
}

static void *arena_alloc(size_t n, size_t align) {
    if (align < ARENA_HDR) align = ARENA_HDR;
    if (align & (align - 1)) return NULL;
    size_t need = n + align + ARENA_HDR;
    size_t off = atomic_fetch_add(&arena_used, need);
    if (off + need > ARENA_SIZE) return NULL;
    uintptr_t base = (uintptr_t)(arena + off + ARENA_HDR);
    uintptr_t p = (base + align - 1) & ~(uintptr_t)(align - 1);
    ((size_t *)p)[-1] = n; /* zero-filled static storage: calloc from here is already zeroed */
    return (void *)p;
}

static inline size_t arena_size(const void *p) { return ((const size_t *)p)[-1]; }

static void init(void) {
    if (real_malloc || initializing) return;
    initializing = 1;
    real_malloc = dlsym(RTLD_NEXT, "malloc");
    real_calloc = dlsym(RTLD_NEXT, "calloc");
    real_realloc = dlsym(RTLD_NEXT, "realloc");
    real_free = dlsym(RTLD_NEXT, "free");
    real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
    real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
    real_memalign = dlsym(RTLD_NEXT, "memalign");
    real_valloc = dlsym(RTLD_NEXT, "valloc");
    real_pvalloc = dlsym(RTLD_NEXT, "pvalloc");
    const char *env = getenv("LONGCTX_ALLOC_METER_THRESHOLD");
    if (env && *env) {
        char *end = NULL;
        unsigned long v = strtoul(env, &end, 10);
        if (end && *end == '\0') threshold = (size_t)v;
    }
    initializing = 0;
}

__attribute__((constructor)) static void meter_init(void) { init(); }

/* ------------------------------------------------------------------ counting */
static inline void count_add(void *p) {
    if (!p || in_arena(p)) return;
    atomic_fetch_add_explicit(&alloc_calls, 1, memory_order_relaxed);
    size_t n = malloc_usable_size(p);
    if (n < threshold) return;
    long long now = atomic_fetch_add_explicit(&current_bytes, (long long)n, memory_order_relaxed) + (long long)n;
    long long pk = atomic_load_explicit(&peak_bytes, memory_order_relaxed);
    while (now > pk && !atomic_compare_exchange_weak_explicit(&peak_bytes, &pk, now, memory_order_relaxed,
                                                              memory_order_relaxed)) {
    }
}

static inline void count_sub_size(size_t n) {
    if (n >= threshold) atomic_fetch_sub_explicit(&current_bytes, (long long)n, memory_order_relaxed);
}

/* ------------------------------------------------------------------ interposed functions */
EXPORT void *malloc(size_t n) {
    if (!real_malloc) {
        init();
        if (!real_malloc) return arena_alloc(n, 16);
    }
    void *p = real_malloc(n);
    count_add(p);
    return p;
}

EXPORT void *calloc(size_t k, size_t n) {
    if (!real_calloc) {
        init();
        if (!real_calloc) {
            size_t total;
            if (__builtin_mul_overflow(k, n, &total)) return NULL;
            return arena_alloc(total, 16);
        }
    }
    void *p = real_calloc(k, n);
    count_add(p);
    return p;
}

EXPORT void free(void *p) {
    if (!p || in_arena(p)) return;
    if (!real_free) init();
    count_sub_size(malloc_usable_size(p));
    real_free(p);
}

EXPORT void *realloc(void *p, size_t n) {
    if (in_arena(p)) {
        void *q = malloc(n);
        if (q) {
            size_t old = arena_size(p);
            memcpy(q, p, old < n ? old : n);
        }
        return q;
    }
    if (!real_realloc) {
        init();
        if (!real_realloc) return arena_alloc(n, 16); /* p is NULL here: nothing real exists yet */
    }
    if (!p) return malloc(n);
    size_t old = malloc_usable_size(p);
    void *q = real_realloc(p, n);
    if (!q) {
        if (n == 0) count_sub_size(old); /* realloc(p, 0) freed p */
        return NULL;
    }
    if (q == p) {
        /* resized in place: the old block never coexisted with the new one */
        count_sub_size(old);
        count_add(q);
    } else {
        /* moved: both blocks were live while the contents were copied */
        count_add(q);
        count_sub_size(old);
    }
    return q;
}

EXPORT void *reallocarray(void *p, size_t k, size_t n) {
    size_t total;
    if (__builtin_mul_overflow(k, n, &total)) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(p, total);
}

EXPORT int posix_memalign(void **out, size_t align, size_t n) {
    if (!real_posix_memalign) {
        init();
        if (!real_posix_memalign) {
            void *p = arena_alloc(n, align);
            if (!p) return ENOMEM;
            *out = p;
            return 0;
        }
    }
    int rc = real_posix_memalign(out, align, n);
    if (rc == 0) count_add(*out);
    return rc;
}

EXPORT void *aligned_alloc(size_t align, size_t n) {
    if (!real_aligned_alloc) {
        init();
        if (!real_aligned_alloc) return arena_alloc(n, align);
    }
    void *p = real_aligned_alloc(align, n);
    count_add(p);
    return p;
}

EXPORT void *memalign(size_t align, size_t n) {
    if (!real_memalign) {
        init();
        if (!real_memalign) return arena_alloc(n, align);
    }
    void *p = real_memalign(align, n);
    count_add(p);
    return p;
}

EXPORT void *valloc(size_t n) {
    if (!real_valloc) {
        init();
        if (!real_valloc) return arena_alloc(n, 4096);
    }
    void *p = real_valloc(n);
    count_add(p);
    return p;
}

EXPORT void *pvalloc(size_t n) {
    if (!real_pvalloc) {
        init();
        if (!real_pvalloc) return arena_alloc((n + 4095) & ~(size_t)4095, 4096);
    }
    void *p = real_pvalloc(n);
    count_add(p);
    return p;
}

/* ------------------------------------------------------------------ meter API (ctypes) */
EXPORT long long meter_current(void) { return atomic_load(&current_bytes); }
EXPORT long long meter_peak(void) { return atomic_load(&peak_bytes); }
EXPORT long long meter_alloc_calls(void) { return atomic_load(&alloc_calls); }
EXPORT long long meter_threshold(void) { return (long long)threshold; }
EXPORT void meter_reset_peak(void) { atomic_store(&peak_bytes, atomic_load(&current_bytes)); }
