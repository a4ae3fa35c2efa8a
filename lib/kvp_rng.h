/* kvp_rng: a small seeded random generator (xoshiro256**, seeded through
 * splitmix64). Every random choice in kvpred — sampling, weight init, data
 * order — takes one of these, so a seed makes a run repeatable. */
#ifndef KVP_RNG_H
#define KVP_RNG_H

#include <stdint.h>

typedef struct kvp_rng {
    uint64_t s[4];
} kvp_rng_t;

void kvp_rng_seed(kvp_rng_t *r, uint64_t seed);
uint64_t kvp_rng_u64(kvp_rng_t *r);
/* uniform in [0, 1) with 24 random bits */
float kvp_rng_uniform(kvp_rng_t *r);
/* standard normal (Box-Muller) */
float kvp_rng_normal(kvp_rng_t *r);
/* uniform integer in [0, n) */
uint64_t kvp_rng_below(kvp_rng_t *r, uint64_t n);

#endif
