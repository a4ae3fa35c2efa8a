/* kvp_blas: OpenBLAS set-up and the facts about it that --stats reports.
 *
 * Debian's OpenBLAS 0.3.21 picks its kernels when the library is loaded. On
 * CPUs newer than it knows (AMD Zen 4/5 with AVX-512) it falls back to its AVX2
 * "Haswell" kernels, about half the speed of its AVX-512 "SkylakeX" kernels on
 * the same machine. The choice is made from OPENBLAS_CORETYPE at load time, so
 * setting it inside main() is too late: kvp_blas_init() instead re-executes the
 * program once with OPENBLAS_CORETYPE=SkylakeX when the CPU has AVX-512
 * (F, BW, DQ, VL) and the library chose a kernel without it. A user's own
 * OPENBLAS_CORETYPE is always respected, and KVP_BLAS_NO_REEXEC=1 turns the
 * re-execution off. */
#ifndef KVP_BLAS_H
#define KVP_BLAS_H

/* Call first thing in main(). Returns normally unless it re-executes. */
void kvp_blas_init(char **argv);

/* The active kernel set ("SkylakeX", "Haswell", ...) and thread count. */
const char *kvp_blas_corename(void);
int kvp_blas_threads(void);
/* Whether kvp_blas_init() switched kernels ("auto-selected" in --stats). */
int kvp_blas_was_switched(void);

#endif
