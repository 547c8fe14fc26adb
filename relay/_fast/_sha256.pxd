# SHA-256 (FIPS 180-4) in C for the compiled cache key and credential hash:
# the digest of every cache miss. CPython's own SHA-256 module runs about
# 2,000 instructions per 64-byte block; x86-64 processors with the SHA
# extensions (SHA-NI) do a block in about 100, so those are used when the
# processor has them (asked once, with CPUID), and a portable C compression
# otherwise. hashlib would reach SHA-NI through OpenSSL, at 0.6 MB of
# digest tables per worker. Both paths give the digests of the standard;
# tests compare them with hashlib over every padding case.

from libc.stdint cimport uint8_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    typedef struct {
        uint32_t state[8];
        uint64_t length;          /* bytes hashed so far */
        uint8_t block[64];        /* a partial block waiting for more */
        size_t used;              /* bytes of it in use */
        int portable;             /* 1: never the SHA-NI path */
    } relay_sha256_ctx;

    static const uint32_t relay_sha256_k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    };

    #define RELAY_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

    /* One round with the eight working variables named in place: eight of
       these in turn rotate the names instead of moving the values. */
    #define RELAY_ROUND(a, b, c, d, e, f, g, h, t) do { \
            uint32_t t1 = h + (RELAY_ROTR(e, 6) ^ RELAY_ROTR(e, 11) ^ RELAY_ROTR(e, 25)) + \
                          (g ^ (e & (f ^ g))) + relay_sha256_k[t] + w[t]; \
            uint32_t t2 = (RELAY_ROTR(a, 2) ^ RELAY_ROTR(a, 13) ^ RELAY_ROTR(a, 22)) + \
                          ((a & b) | (c & (a | b))); \
            d += t1; \
            h = t1 + t2; \
        } while (0)

    static void relay_sha256_portable(uint32_t *state, const uint8_t *data, size_t blocks) {
        uint32_t w[64];
        uint32_t a, b, c, d, e, f, g, h;
        int t;
        while (blocks--) {
            for (t = 0; t < 16; t++) {
                w[t] = ((uint32_t)data[4 * t] << 24) | ((uint32_t)data[4 * t + 1] << 16) |
                       ((uint32_t)data[4 * t + 2] << 8) | (uint32_t)data[4 * t + 3];
            }
            for (t = 16; t < 64; t++) {
                uint32_t s0 = RELAY_ROTR(w[t - 15], 7) ^ RELAY_ROTR(w[t - 15], 18) ^ (w[t - 15] >> 3);
                uint32_t s1 = RELAY_ROTR(w[t - 2], 17) ^ RELAY_ROTR(w[t - 2], 19) ^ (w[t - 2] >> 10);
                w[t] = w[t - 16] + s0 + w[t - 7] + s1;
            }
            a = state[0]; b = state[1]; c = state[2]; d = state[3];
            e = state[4]; f = state[5]; g = state[6]; h = state[7];
            for (t = 0; t < 64; t += 8) {
                RELAY_ROUND(a, b, c, d, e, f, g, h, t);
                RELAY_ROUND(h, a, b, c, d, e, f, g, t + 1);
                RELAY_ROUND(g, h, a, b, c, d, e, f, t + 2);
                RELAY_ROUND(f, g, h, a, b, c, d, e, t + 3);
                RELAY_ROUND(e, f, g, h, a, b, c, d, t + 4);
                RELAY_ROUND(d, e, f, g, h, a, b, c, t + 5);
                RELAY_ROUND(c, d, e, f, g, h, a, b, t + 6);
                RELAY_ROUND(b, c, d, e, f, g, h, a, t + 7);
            }
            state[0] += a; state[1] += b; state[2] += c; state[3] += d;
            state[4] += e; state[5] += f; state[6] += g; state[7] += h;
            data += 64;
        }
    }

    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <cpuid.h>
    #include <immintrin.h>
    #define RELAY_SHA_NI 1

    /* The SHA-NI compression: the state as the instructions want it (ABEF
       and CDGH); per group of four rounds, the message words (loaded, or
       scheduled with sha256msg1/msg2 from the four groups before, which
       m0..m3 hold in turn) plus their constants, two sha256rnds2 each. */
    #define RELAY_NI_ROUNDS(x, i) do { \
            msg = _mm_add_epi32(x, _mm_loadu_si128((const __m128i *)&relay_sha256_k[4 * (i)])); \
            s1 = _mm_sha256rnds2_epu32(s1, s0, msg); \
            s0 = _mm_sha256rnds2_epu32(s0, s1, _mm_shuffle_epi32(msg, 0x0E)); \
        } while (0)
    #define RELAY_NI_SCHEDULE(x0, x1, x2, x3) \
        x0 = _mm_sha256msg2_epu32( \
            _mm_add_epi32(_mm_sha256msg1_epu32(x0, x1), _mm_alignr_epi8(x3, x2, 4)), x3)

    __attribute__((target("sha,sse4.1,ssse3")))
    static void relay_sha256_ni(uint32_t *state, const uint8_t *data, size_t blocks) {
        const __m128i order = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
        __m128i tmp = _mm_loadu_si128((const __m128i *)&state[0]);
        __m128i s1 = _mm_loadu_si128((const __m128i *)&state[4]);
        __m128i s0, abef, cdgh, msg, m0, m1, m2, m3;
        int i;
        tmp = _mm_shuffle_epi32(tmp, 0xB1);
        s1 = _mm_shuffle_epi32(s1, 0x1B);
        s0 = _mm_alignr_epi8(tmp, s1, 8);
        s1 = _mm_blend_epi16(s1, tmp, 0xF0);
        while (blocks--) {
            abef = s0;
            cdgh = s1;
            m0 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)data), order);
            RELAY_NI_ROUNDS(m0, 0);
            m1 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 16)), order);
            RELAY_NI_ROUNDS(m1, 1);
            m2 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 32)), order);
            RELAY_NI_ROUNDS(m2, 2);
            m3 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 48)), order);
            RELAY_NI_ROUNDS(m3, 3);
            for (i = 4; i < 16; i += 4) {
                RELAY_NI_SCHEDULE(m0, m1, m2, m3);
                RELAY_NI_ROUNDS(m0, i);
                RELAY_NI_SCHEDULE(m1, m2, m3, m0);
                RELAY_NI_ROUNDS(m1, i + 1);
                RELAY_NI_SCHEDULE(m2, m3, m0, m1);
                RELAY_NI_ROUNDS(m2, i + 2);
                RELAY_NI_SCHEDULE(m3, m0, m1, m2);
                RELAY_NI_ROUNDS(m3, i + 3);
            }
            s0 = _mm_add_epi32(s0, abef);
            s1 = _mm_add_epi32(s1, cdgh);
            data += 64;
        }
        tmp = _mm_shuffle_epi32(s0, 0x1B);
        s1 = _mm_shuffle_epi32(s1, 0xB1);
        s0 = _mm_blend_epi16(tmp, s1, 0xF0);
        s1 = _mm_alignr_epi8(s1, tmp, 8);
        _mm_storeu_si128((__m128i *)&state[0], s0);
        _mm_storeu_si128((__m128i *)&state[4], s1);
    }

    /* -1: not asked yet; 0 or 1: whether this processor has SHA-NI. */
    static int relay_sha_ni_present = -1;

    static int relay_sha_ni(void) {
        unsigned int a, b, c, d;
        if (relay_sha_ni_present < 0) {
            int present = 0;
            if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSSE3) && (c & bit_SSE4_1) &&
                __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29))) {
                present = 1;
            }
            relay_sha_ni_present = present;
        }
        return relay_sha_ni_present;
    }
    #else
    #define RELAY_SHA_NI 0
    static int relay_sha_ni(void) { return 0; }
    static void relay_sha256_ni(uint32_t *state, const uint8_t *data, size_t blocks) {
        relay_sha256_portable(state, data, blocks);
    }
    #endif

    static void relay_sha256_blocks(relay_sha256_ctx *ctx, const uint8_t *data, size_t blocks) {
        if (!ctx->portable && relay_sha_ni()) {
            relay_sha256_ni(ctx->state, data, blocks);
        } else {
            relay_sha256_portable(ctx->state, data, blocks);
        }
    }

    static void relay_sha256_init(relay_sha256_ctx *ctx, int portable) {
        static const uint32_t initial[8] = {
            0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
            0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
        };
        memcpy(ctx->state, initial, sizeof(initial));
        ctx->length = 0;
        ctx->used = 0;
        ctx->portable = portable;
    }

    static void relay_sha256_update(relay_sha256_ctx *ctx, const uint8_t *data, size_t len) {
        size_t take;
        ctx->length += len;
        if (ctx->used) {
            take = 64 - ctx->used < len ? 64 - ctx->used : len;
            memcpy(ctx->block + ctx->used, data, take);
            ctx->used += take;
            data += take;
            len -= take;
            if (ctx->used < 64) {
                return;
            }
            relay_sha256_blocks(ctx, ctx->block, 1);
            ctx->used = 0;
        }
        if (len >= 64) {
            relay_sha256_blocks(ctx, data, len / 64);
            data += len & ~(size_t)63;
            len &= 63;
        }
        if (len) {
            memcpy(ctx->block, data, len);
            ctx->used = len;
        }
    }

    static void relay_sha256_final(relay_sha256_ctx *ctx, uint8_t *digest) {
        uint8_t tail[128];
        uint64_t bits = ctx->length * 8;
        size_t n = ctx->used, total = n < 56 ? 64 : 128;
        int k;
        memcpy(tail, ctx->block, n);
        tail[n] = 0x80;
        memset(tail + n + 1, 0, total - n - 1);
        for (k = 0; k < 8; k++) {
            tail[total - 1 - k] = (uint8_t)(bits >> (8 * k));
        }
        relay_sha256_blocks(ctx, tail, total / 64);
        for (k = 0; k < 8; k++) {
            digest[4 * k] = (uint8_t)(ctx->state[k] >> 24);
            digest[4 * k + 1] = (uint8_t)(ctx->state[k] >> 16);
            digest[4 * k + 2] = (uint8_t)(ctx->state[k] >> 8);
            digest[4 * k + 3] = (uint8_t)ctx->state[k];
        }
    }
    """
    ctypedef struct relay_sha256_ctx:
        pass
    int relay_sha_ni() noexcept nogil
    void relay_sha256_init(relay_sha256_ctx *ctx, int portable) noexcept nogil
    void relay_sha256_update(relay_sha256_ctx *ctx, const uint8_t *data, size_t length) noexcept nogil
    void relay_sha256_final(relay_sha256_ctx *ctx, uint8_t *digest) noexcept nogil
