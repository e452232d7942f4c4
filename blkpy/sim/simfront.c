/* See simfront.h. Ring rules follow Xen's ring.h (spec blkif.md section 7.3). */
#include <string.h>
#include <time.h>

#define SRING_HDR 64
#define REQ_PROD 0
#define REQ_EVENT 4
#define RSP_PROD 8
#define RSP_EVENT 12
#define RSP_OFF_OP 8
#define RSP_OFF_STATUS 10
#define GTF_PERMIT_ACCESS 1
#define GTF_READING 0x8
#define GTF_WRITING 0x10

static inline uint32_t sf_load(const uint8_t *ring, int off)
{
    return __atomic_load_n((const uint32_t *)(ring + off), __ATOMIC_ACQUIRE);
}

static inline void sf_store(uint8_t *ring, int off, uint32_t v)
{
    __atomic_store_n((uint32_t *)(ring + off), v, __ATOMIC_RELEASE);
}

static inline uint8_t *sf_slot(struct simfront *f, uint32_t idx)
{
    return f->ring + SRING_HDR + (size_t)(idx & (f->size - 1)) * f->entry_size;
}

static uint64_t sf_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t sf_next_sector(struct simfront *f)
{
    uint64_t slot;
    if (f->random) {
        uint64_t x = f->rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f->rng = x;
        slot = x % f->slots_in_disk;
    } else {
        slot = f->next_slot;
        f->next_slot = (slot + 1) % f->slots_in_disk;
    }
    return slot * f->step_sectors;
}

#define SF_HIST_SUB_BITS 6 /* 64 bins per power of two: bin width <= 1/64 of its start */

uint32_t simfront_hist_index(uint64_t ns)
{
    /* Below 2^(SUB_BITS+1) the bin is the value itself; above, the top SUB_BITS+1 bits
     * (a mantissa in [64, 128)) plus 64 bins per octave, so bins are contiguous. */
    uint32_t msb = ns ? 63u - (uint32_t)__builtin_clzll(ns) : 0;
    uint32_t shift = msb > SF_HIST_SUB_BITS ? msb - SF_HIST_SUB_BITS : 0;
    uint64_t index = ((uint64_t)shift << SF_HIST_SUB_BITS) + (ns >> shift);
    return index < SIMFRONT_HIST_BINS ? (uint32_t)index : SIMFRONT_HIST_BINS - 1;
}

uint64_t simfront_hist_lower(uint32_t index)
{
    const uint32_t sub = 1u << SF_HIST_SUB_BITS;
    if (index < 2 * sub)
        return index;
    uint32_t shift = index / sub - 1;
    return (uint64_t)(index % sub + sub) << shift;
}

void simfront_init(struct simfront *f)
{
    f->req_prod_pvt = sf_load(f->ring, REQ_PROD);
    f->rsp_cons = sf_load(f->ring, RSP_PROD);
    if (f->depth == 0 || f->depth > f->size)
        f->depth = f->size;
    /* Only ids below depth are ever in flight, so only they need templates. */
    f->n_free = 0;
    for (uint32_t i = f->size; i-- > 0;) {
        if (i < f->depth)
            f->free_ids[f->n_free++] = i;
        f->pending[i] = 0;
    }
    if (f->rng == 0)
        f->rng = 0x9E3779B97F4A7C15ull;
    if (f->step_sectors == 0)
        f->step_sectors = f->sectors_per_req;
    if (f->slots_in_disk && f->next_slot >= f->slots_in_disk)
        f->next_slot %= f->slots_in_disk;
    f->in_flight = 0;
    f->submitted = f->completed = f->errors = f->bad_responses = 0;
    f->pushes = f->polls = 0;
    f->grants_ended = f->still_mapped = 0;
}

/* Make the request's grant entries valid (domid and frame never change). */
static void sf_grant(struct simfront *f, uint32_t id)
{
    const uint32_t *refs = f->id_grefs + (size_t)id * f->grefs_per_id;
    for (uint32_t i = 0; i < f->grefs_per_id; i++)
        __atomic_store_n((uint16_t *)(f->grant_table + (size_t)refs[i] * 8), GTF_PERMIT_ACCESS,
                         __ATOMIC_RELEASE);
}

/* Revoke the request's grants; returns 0 if the backend still maps one of them. */
static int sf_end_grants(struct simfront *f, uint32_t id)
{
    const uint32_t *refs = f->id_grefs + (size_t)id * f->grefs_per_id;
    int ok = 1;
    for (uint32_t i = 0; i < f->grefs_per_id; i++) {
        uint32_t *word = (uint32_t *)(f->grant_table + (size_t)refs[i] * 8);
        uint32_t cur = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        for (;;) {
            if (cur & (GTF_READING | GTF_WRITING)) {
                f->still_mapped++;
                ok = 0;
                break;
            }
            if (__atomic_compare_exchange_n(word, &cur, cur & 0xFFFF0000u, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_ACQUIRE)) {
                f->grants_ended++;
                break;
            }
        }
    }
    return ok;
}

/* Consume every available response; returns how many, or -1 if the ring is broken. */
static int sf_consume(struct simfront *f)
{
    uint32_t rp = sf_load(f->ring, RSP_PROD); /* acquire: the rmb before reading slots */
    uint32_t n = rp - f->rsp_cons;
    if (n > f->size || n > f->req_prod_pvt - f->rsp_cons) {
        f->bad_responses++;
        return -1;
    }
    /* One clock read per batch of responses: they became visible together. */
    uint64_t now = f->lat_hist && n ? sf_now_ns() : 0;
    for (uint32_t i = f->rsp_cons; i != rp; i++) {
        const uint8_t *slot = sf_slot(f, i);
        uint64_t id;
        int16_t status;
        memcpy(&id, slot, 8);
        memcpy(&status, slot + RSP_OFF_STATUS, 2);
        if (id >= f->size || !f->pending[id] || slot[RSP_OFF_OP] != f->response_op) {
            f->bad_responses++;
            f->rsp_cons = rp;
            return -1;
        }
        if (status != 0)
            f->errors++;
        if (f->grant_table && !sf_end_grants(f, (uint32_t)id)) {
            f->rsp_cons = i + 1;
            return -1; /* "backend has not unmapped grant": the pages must not be reused */
        }
        if (f->lat_hist)
            f->lat_hist[simfront_hist_index(now - f->submit_ns[id])]++;
        f->pending[id] = 0;
        f->free_ids[f->n_free++] = (uint32_t)id;
        f->in_flight--;
        f->completed++;
    }
    f->rsp_cons = rp;
    return (int)n;
}

/* Fill free slots up to the depth; returns 1 if the backend must be notified. */
static int sf_fill_and_push(struct simfront *f)
{
    uint32_t old = sf_load(f->ring, REQ_PROD);
    int queued = 0;
    /* Filling a slot is a memcpy: one clock read stands for the whole push. */
    uint64_t now = f->lat_hist && f->in_flight < f->depth && f->n_free ? sf_now_ns() : 0;
    while (f->in_flight < f->depth && f->n_free > 0 &&
           (f->limit == 0 || f->submitted < f->limit)) {
        uint32_t id = f->free_ids[--f->n_free];
        uint8_t *slot = sf_slot(f, f->req_prod_pvt);
        uint64_t id64 = id, sector = sf_next_sector(f);
        if (f->grant_table)
            sf_grant(f, id);
        memcpy(slot, f->templates + (size_t)id * f->entry_size, f->entry_size);
        memcpy(slot + f->id_off, &id64, 8);
        memcpy(slot + f->sector_off, &sector, 8);
        f->pending[id] = 1;
        if (f->lat_hist)
            f->submit_ns[id] = now;
        f->in_flight++;
        f->submitted++;
        f->req_prod_pvt++;
        queued++;
    }
    if (!queued)
        return 0;
    /* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: slots before the index, index before the
     * event read. */
    uint32_t new = f->req_prod_pvt;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    sf_store(f->ring, REQ_PROD, new);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    f->pushes++;
    uint32_t ev = sf_load(f->ring, REQ_EVENT);
    return (uint32_t)(new - ev) < (uint32_t)(new - old);
}

int simfront_step(struct simfront *f, uint64_t poll_ns)
{
    uint64_t deadline = 0;
    for (;;) {
        int got = sf_consume(f);
        if (got < 0)
            return SIMFRONT_BROKEN;
        int notify = sf_fill_and_push(f);
        if (notify)
            return SIMFRONT_NOTIFY;
        if (f->in_flight == 0 && f->limit && f->submitted >= f->limit)
            return SIMFRONT_DONE;
        if (got > 0) {
            deadline = 0;
            continue;
        }
        f->polls++;
        if (f->in_flight == 0)
            return SIMFRONT_WAIT; /* nothing to wait for: let the caller decide */
        uint64_t now = sf_now_ns();
        if (deadline == 0)
            deadline = now + poll_ns;
        if (now < deadline)
            continue;
        /* RING_FINAL_CHECK_FOR_RESPONSES before sleeping. */
        sf_store(f->ring, RSP_EVENT, f->rsp_cons + 1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (sf_load(f->ring, RSP_PROD) != f->rsp_cons)
            continue;
        return SIMFRONT_WAIT;
    }
}
