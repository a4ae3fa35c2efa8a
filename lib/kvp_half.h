/* kvp_half: conversions between float and the 16-bit and 8-bit storage types
 * GGUF files use (IEEE half, bfloat16, Q8_0 blocks). */
#ifndef KVP_HALF_H
#define KVP_HALF_H

#include <stddef.h>
#include <stdint.h>

float kvp_f16_to_f32(uint16_t h);
uint16_t kvp_f32_to_f16(float f); /* round to nearest even; overflow -> inf; NaN kept */
float kvp_bf16_to_f32(uint16_t h);
uint16_t kvp_f32_to_bf16(float f); /* round to nearest even; NaN kept quiet */

void kvp_f16_to_f32_row(const uint16_t *src, float *dst, size_t n);
void kvp_f32_to_f16_row(const float *src, uint16_t *dst, size_t n);
void kvp_bf16_to_f32_row(const uint16_t *src, float *dst, size_t n);
void kvp_f32_to_bf16_row(const float *src, uint16_t *dst, size_t n);

/* Q8_0: blocks of 32 values, each a little-endian f16 scale d then 32 int8 q;
 * value = d * q. n must be a multiple of 32. d = max|x| / 127 as in ggml. */
void kvp_q8_0_to_f32_row(const void *src, float *dst, size_t n);
void kvp_f32_to_q8_0_row(const float *src, void *dst, size_t n);

#endif
