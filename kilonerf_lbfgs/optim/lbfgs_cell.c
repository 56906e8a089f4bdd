/* One BatchedLBFGS evaluation's history work for a range of cells, each cell done whole
 * while its pairs are in the cache.
 *
 * The torch path (optim/lbfgs.py) makes two passes over every cell's history per evaluation:
 * the projection [S;Y]^T g of the new gradient and, after the Gram update and the compact
 * coefficients, the combination coef . [S;Y] that makes the next direction. At 64 cells x
 * 2241 parameters x 100 pairs the bfloat16 history is 57 MB, larger than a CPU's last-level
 * cache, so both passes stream it from memory, and push the Gram matrices out on the way.
 * Here a cell's projection, Gram update, coefficients and combination run back to back, so
 * the history is read from memory once and everything else stays in the cache.
 *
 * The arithmetic is that of the torch path (same formulas, same precisions: products of the
 * stored pairs accumulate in float32, the Gram matrices and coefficients are float64), in
 * another summation order. Shapes (n cells, m slots, p parameters):
 *   sy [n, m, 2, p] storage (sy[k, i, 0] = s_i, sy[k, i, 1] = y_i), sty / yty [n, m, m].
 * Compiled at run time by optim/native.py, for float32 and bfloat16 storage, with OpenMP:
 * linked against the libgomp that PyTorch has already loaded, so the cells run on PyTorch's
 * own thread pool (a second pool would fight its spinning threads for the cores).
 */
#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t n, m, p, slots_used;          /* slots_used: before this evaluation's write */
    void *sy;                             /* [n, m, 2, p] storage, updated (slot ptr) */
    const void *hs, *hy;                  /* [n, p] storage: the new pair as stored */
    const float *g;                       /* [n, p] the gradient the cells now stand at */
    double *sty, *yty;                    /* [n, m, m], updated */
    uint8_t *valid;                       /* [n, m], updated */
    int64_t *ptr;                         /* [n], updated */
    double *gamma;                        /* [n], updated */
    const double *proj0;                  /* [n, 2m] [S;Y]^T g0 of the old direction */
    const double *dgamma, *dcoef;         /* [n], [n, 2m] the old direction's coefficients */
    const double *t_acc, *pair_sy, *pair_yy;  /* [n] accepted step; s.y and y.y of the pair */
    const uint8_t *accept, *keep, *renew; /* [n] */
    double *proj;                         /* out [n, 2m]: [S;Y]^T g (proj0 where not accept) */
    double *coef;                         /* out [n, 2m]: direction coefficients (renew) */
    float *d;                             /* out [n, p]: -(gamma g + coef . [S;Y]) (renew) */
} CellArgs;

static inline float widen_bf16(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float widen_f32(float x) { return x; }


/* The double-precision part of one cell: Gram update for a kept pair, then (renew) the
 * compact coefficients. P: [2m] the projection (patched here for a kept pair). */
static void cell_algebra(const CellArgs *a, int64_t k, double *P, const double *ps_new,
                         double *scratch) {
    const int64_t m = a->m;
    double *sty = a->sty + k * m * m, *yty = a->yty + k * m * m;
    uint8_t *valid = a->valid + k * m;
    const double *proj0 = a->proj0 + k * 2 * m;
    double *row = scratch, *c = scratch + m, *r = scratch + 2 * m, *top = scratch + 3 * m;
    if (a->keep[k]) {
        const int64_t j = a->ptr[k];
        const double *dS = a->dcoef + k * 2 * m, *dY = dS + m, t = a->t_acc[k];
        /* s^T Y_old = -t (dgamma g0^T Y + dcoef_S . S^T Y + dcoef_Y . Y^T Y), from the old
         * Gram matrices: no pass over the pairs */
        for (int64_t i = 0; i < m; i++) row[i] = a->dgamma[k] * proj0[m + i];
        for (int64_t l = 0; l < m; l++) {
            const double cs = dS[l], cy = dY[l];
            if (cs != 0.0) { const double *q = sty + l * m; for (int64_t i = 0; i < m; i++) row[i] += cs * q[i]; }
            if (cy != 0.0) { const double *q = yty + l * m; for (int64_t i = 0; i < m; i++) row[i] += cy * q[i]; }
        }
        for (int64_t i = 0; i < m; i++) row[i] *= -t;
        const double sy = a->pair_sy[k], yy = a->pair_yy[k];
        row[j] = sy;
        for (int64_t i = 0; i < m; i++) {       /* columns: S_old^T y, Y_old^T y */
            const double cs = (i == j) ? sy : P[i] - proj0[i];
            const double cy = (i == j) ? yy : P[m + i] - proj0[m + i];
            sty[i * m + j] = cs;
            yty[i * m + j] = cy;
            yty[j * m + i] = cy;
        }
        memcpy(sty + j * m, row, (size_t)m * sizeof(double));
        valid[j] = 1;
        a->ptr[k] = (j + 1) % m;
        a->gamma[k] = sy / (yy > 1e-300 ? yy : 1e-300);
        P[j] = ps_new[0];
        P[m + j] = ps_new[1];
    }
    if (!a->renew[k]) return;
    /* compact coefficients (see optim/compact.py): R = chronological upper triangle of S^T Y.
     * c = R^-1 a by back substitution newest to oldest: c is zero on older and invalid
     * slots when a slot is solved, so a whole row of S^T Y can be dotted with it. */
    const int64_t p0 = a->ptr[k];
    const double g = a->gamma[k];
    for (int64_t i = 0; i < m; i++) c[i] = 0.0;
    for (int64_t q = m - 1; q >= 0; q--) {
        const int64_t u = (p0 + q) % m;
        if (!valid[u]) continue;
        const double *su = sty + u * m;
        double acc = 0.0;
        for (int64_t i = 0; i < m; i++) acc += su[i] * c[i];
        c[u] = (P[u] - acc) / su[u];
    }
    /* rhs = D c + gamma (Y^T Y) c - gamma b on valid slots */
    for (int64_t u = 0; u < m; u++) {
        if (!valid[u]) { r[u] = 0.0; continue; }
        const double *yu = yty + u * m;
        double acc = 0.0;
        for (int64_t i = 0; i < m; i++) acc += yu[i] * c[i];
        r[u] = sty[u * m + u] * c[u] + g * acc - g * P[m + u];
    }
    /* top = R^-T rhs by forward substitution oldest to newest, column by column: once top_u
     * is known, row u of S^T Y carries its share to every later slot */
    for (int64_t i = 0; i < m; i++) top[i] = 0.0;
    for (int64_t q = 0; q < m; q++) {
        const int64_t u = (p0 + q) % m;
        if (!valid[u]) continue;
        const double *su = sty + u * m;
        const double tu = r[u] / su[u];
        top[u] = tu;
        for (int64_t i = 0; i < m; i++) r[i] -= su[i] * tu;
    }
    double *coef = a->coef + k * 2 * m;
    for (int64_t u = 0; u < m; u++) {
        coef[u] = valid[u] ? top[u] : 0.0;
        coef[m + u] = valid[u] ? -g * c[u] : 0.0;
    }
}

#define CELL_KERNEL(NAME, T, WIDEN)                                                           \
static void NAME##_cell(const CellArgs *a, int64_t k, double *scratch) {                    \
    const int64_t m = a->m, p = a->p;                                                       \
    {                                                                                       \
        T *rows = (T *)a->sy + k * m * 2 * p;                                               \
        const float *g = a->g + k * p;                                                      \
        double *P = a->proj + k * 2 * m;                                                    \
        double ps_new[2] = {0.0, 0.0};                                                      \
        if (a->accept[k]) {                                                                 \
            /* [S;Y]_old^T g over the slots in use (the others are zero) */                 \
            for (int64_t i = 0; i < 2 * m; i++) P[i] = 0.0;                                 \
            for (int64_t i = 0; i < a->slots_used; i++) {                                   \
                const T *s = rows + 2 * i * p, *y = s + p;                                  \
                float ts = 0.0f, ty = 0.0f;                                                 \
                for (int64_t e = 0; e < p; e++) {                                           \
                    ts += WIDEN(s[e]) * g[e];                                               \
                    ty += WIDEN(y[e]) * g[e];                                               \
                }                                                                           \
                P[i] = ts;                                                                  \
                P[m + i] = ty;                                                              \
            }                                                                               \
            if (a->keep[k]) {                                                               \
                const T *hs = (const T *)a->hs + k * p, *hy = (const T *)a->hy + k * p;    \
                float ts = 0.0f, ty = 0.0f;                                                 \
                for (int64_t e = 0; e < p; e++) {                                           \
                    ts += WIDEN(hs[e]) * g[e];                                              \
                    ty += WIDEN(hy[e]) * g[e];                                              \
                }                                                                           \
                ps_new[0] = ts;                                                             \
                ps_new[1] = ty;                                                             \
                T *slot = rows + 2 * a->ptr[k] * p;                                         \
                memcpy(slot, hs, (size_t)p * sizeof(T));                                    \
                memcpy(slot + p, hy, (size_t)p * sizeof(T));                                \
            }                                                                               \
        } else {                                                                            \
            memcpy(P, a->proj0 + k * 2 * m, (size_t)(2 * m) * sizeof(double));             \
        }                                                                                   \
        cell_algebra(a, k, P, ps_new, scratch);                                             \
        float *d = a->d + k * p;                                                            \
        if (!a->renew[k]) {                                                                 \
            memset(a->coef + k * 2 * m, 0, (size_t)(2 * m) * sizeof(double));              \
            memset(d, 0, (size_t)p * sizeof(float));                                        \
            return;                                                                         \
        }                                                                                   \
        /* d = -(gamma g + coef . [S;Y]), the pairs read again while in the cache */        \
        const double *coef = a->coef + k * 2 * m;                                           \
        const float gm = (float)a->gamma[k];                                                \
        for (int64_t e = 0; e < p; e++) d[e] = 0.0f;                                        \
        for (int64_t i = 0; i < m; i++) {                                                   \
            const float cs = (float)coef[i], cy = (float)coef[m + i];                       \
            if (cs == 0.0f && cy == 0.0f) continue;                                         \
            const T *s = rows + 2 * i * p, *y = s + p;                                      \
            for (int64_t e = 0; e < p; e++) d[e] += cs * WIDEN(s[e]) + cy * WIDEN(y[e]);    \
        }                                                                                   \
        for (int64_t e = 0; e < p; e++) d[e] = -(d[e] + gm * g[e]);                         \
    }                                                                                       \
}                                                                                           \
/* every cell of the batch, split between n_threads threads of the process's OpenMP pool */ \
void NAME(const CellArgs *a, int64_t n_threads) {                                           \
    _Pragma("omp parallel num_threads(n_threads)")                                          \
    {                                                                                       \
        double scratch[4 * a->m];                                                           \
        _Pragma("omp for schedule(static)")                                                 \
        for (int64_t k = 0; k < a->n; k++) NAME##_cell(a, k, scratch);                     \
    }                                                                                       \
}

CELL_KERNEL(lbfgs_cells_bf16, uint16_t, widen_bf16)
CELL_KERNEL(lbfgs_cells_f32, float, widen_f32)
