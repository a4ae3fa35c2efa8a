/* kvp_time: monotonic and wall clocks in one place. */
#ifndef KVP_TIME_H
#define KVP_TIME_H

#include <stdint.h>
#include <time.h>

/* Seconds on the monotonic clock (for durations). */
static inline double kvp_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Nanoseconds since the epoch (for trace records that cross processes). */
static inline int64_t kvp_wall_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
