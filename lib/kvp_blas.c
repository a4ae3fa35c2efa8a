#include "kvp_blas.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Kernel sets of this OpenBLAS that use AVX-512. */
static int corename_has_avx512(const char *name) {
    static const char *const fast[] = {"SkylakeX", "Cooperlake", "SapphireRapids"};
    for (size_t i = 0; i < sizeof fast / sizeof fast[0]; i++)
        if (name && !strcmp(name, fast[i])) return 1;
    return 0;
}

static int cpu_has_avx512(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

void kvp_blas_init(char **argv) {
    if (getenv("OPENBLAS_CORETYPE") || getenv("KVP_BLAS_NO_REEXEC")) return;
    if (!cpu_has_avx512() || corename_has_avx512(openblas_get_corename())) return;
    /* KVP_BLAS_SWITCHED tells the new image that it was switched, and also
     * stops a loop should the library ignore the variable. */
    setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
    setenv("KVP_BLAS_SWITCHED", "1", 1);
    execv("/proc/self/exe", argv);
    /* exec failed (no /proc?): carry on with the slower kernels. */
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv("KVP_BLAS_SWITCHED");
}

const char *kvp_blas_corename(void) {
    const char *n = openblas_get_corename();
    return n ? n : "unknown";
}

int kvp_blas_threads(void) {
    return openblas_get_num_threads();
}

int kvp_blas_was_switched(void) {
    const char *s = getenv("KVP_BLAS_SWITCHED");
    return s && !strcmp(s, "1");
}
