/* Bit helpers of the sampling kernels (sampling.pxi): the binary searches for the top-k
   threshold and the top-p threshold run over the 32-bit patterns of floats, so they need
   float <-> bits conversions that order like the floats. */

#ifndef GPT2S_SAMPLING_H
#define GPT2S_SAMPLING_H

#include <stdint.h>
#include <string.h>
/* An unsigned key that orders like the float (for non-NaN x): flip every bit of a
   negative float, set the sign bit of a non-negative one. */
static inline uint32_t gpt2s_float_key(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
static inline float gpt2s_key_float(uint32_t k) {
    uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float x;
    memcpy(&x, &u, sizeof(x));
    return x;
}
static inline float gpt2s_bits_float(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof(x));
    return x;
}
static inline uint32_t gpt2s_float_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    return u;
}

#endif
