/* freshcheck: does anything write into memory it does not own in this dom0?
 *
 * A diagnostic for the lab (LAB_FRESHCHECK=1), run beside a phase: threads map anonymous
 * memory, write one word per page as malloc writes a chunk header into fresh memory (top
 * chunks of new arenas and of a heap that grows always land there), keep the regions a
 * while, then check that every page still holds exactly that word and zeros. This process
 * never maps a grant nor does I/O into its regions, so any other byte was written by
 * someone else: the kernel, the hypervisor or the emulator (a stale TLB entry, a page
 * handed out twice). Each foreign write is reported with the bytes around it, so what kind
 * of data it was (guest data, ring slots, another process's heap) says where it came from.
 *
 * `freshcheck tlb SECONDS` checks the TLB shootdown instead: a thread on one CPU keeps a
 * page in its TLB, a thread on another CPU discards the page (MADV_DONTNEED, which must
 * flush every CPU's entry for it before it returns), then the first thread writes to it.
 * The write must land in the page the second thread then reads; if it does not, it went
 * through a stale TLB entry into a physical page that had been freed (and may already
 * belong to another process): memory corruption for whoever owns that page now.
 *
 * `freshcheck copy SECONDS [THREADS]` checks plain copies instead: threads (more than CPUs,
 * so they are switched in and out) memcpy patterns of every size and alignment with glibc's
 * vectorised memcpy and compare the result word by word with scalar code. A serve's core
 * held a string object whose type pointer alone was zero, as if one half of a 16-byte
 * vector move had been lost.
 *
 * Usage: freshcheck SECONDS [THREADS] | freshcheck tlb SECONDS | freshcheck copy SECONDS
 * [THREADS]; prints FRESHCHECK lines,
 * exit status 1 if anything was found damaged. SIGTERM/SIGINT end it early (the summary
 * is still printed).
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define REGION_PAGES 64      /* 256 KiB: above malloc's mmap threshold, like a new heap */
#define SLOTS 8              /* regions a thread keeps alive at once */
#define MAX_THREADS 16
#define MAX_REPORTS 20

static volatile sig_atomic_t stop;
static uint64_t pages_checked[MAX_THREADS], pages_bad[MAX_THREADS];
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static int reports;

static unsigned header_word(size_t page) { return (unsigned)((page * 37) % WORDS); }

static void report(int tid, const uint8_t *region, size_t page, const uint64_t *words,
                   unsigned first_bad, uint64_t tag)
{
    pthread_mutex_lock(&out_lock);
    if (reports++ < MAX_REPORTS) {
        unsigned nonzero = 0;
        for (unsigned w = 0; w < WORDS; w++)
            nonzero += words[w] != 0;
        printf("FRESHCHECK: BAD pid %d thread %d region %p page %zu word %u: got %016" PRIx64
               " expected %016" PRIx64 " (header word %u, %u non-zero words in the page)\n",
               (int)getpid(), tid, (const void *)region, page, first_bad, words[first_bad],
               first_bad == header_word(page) ? tag ^ page : 0, header_word(page), nonzero);
        unsigned from = first_bad >= 8 ? first_bad - 8 : 0;
        for (unsigned w = from; w < from + 32 && w < WORDS; w += 4)
            printf("FRESHCHECK:   +%04x %016" PRIx64 " %016" PRIx64 " %016" PRIx64 " %016" PRIx64 "\n",
                   w * 8, words[w], w + 1 < WORDS ? words[w + 1] : 0,
                   w + 2 < WORDS ? words[w + 2] : 0, w + 3 < WORDS ? words[w + 3] : 0);
        fflush(stdout);
    }
    pthread_mutex_unlock(&out_lock);
}

static void verify(int tid, const uint8_t *region, uint64_t tag)
{
    for (size_t p = 0; p < REGION_PAGES; p++) {
        const uint64_t *words = (const uint64_t *)(region + p * PAGE);
        unsigned hw = header_word(p);
        for (unsigned w = 0; w < WORDS; w++) {
            uint64_t want = w == hw ? tag ^ p : 0;
            if (words[w] != want) {
                pages_bad[tid]++;
                report(tid, region, p, words, w, tag);
                break;
            }
        }
        pages_checked[tid]++;
    }
}

static void *churn(void *arg)
{
    int tid = (int)(intptr_t)arg;
    uint8_t *slot[SLOTS] = {0};
    uint64_t tags[SLOTS] = {0};
    struct timespec pause = {0, 2 * 1000 * 1000};
    for (uint64_t seq = 0; !stop; seq++) {
        unsigned i = (unsigned)(seq % SLOTS);
        if (slot[i]) {
            verify(tid, slot[i], tags[i]);
            munmap(slot[i], REGION_PAGES * PAGE);
            slot[i] = NULL;
        }
        uint8_t *r = mmap(NULL, REGION_PAGES * PAGE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (r == MAP_FAILED) {
            nanosleep(&pause, NULL);
            continue;
        }
        uint64_t tag = ((uint64_t)(tid + 1) << 56) | (seq << 8) | 0x5a;
        for (size_t p = 0; p < REGION_PAGES; p++)   /* first touch is a write, as malloc's */
            ((volatile uint64_t *)(r + p * PAGE))[header_word(p)] = tag ^ p;
        slot[i] = r;
        tags[i] = tag;
        nanosleep(&pause, NULL);
    }
    for (unsigned i = 0; i < SLOTS; i++)
        if (slot[i])
            verify(tid, slot[i], tags[i]);
    return NULL;
}

static void on_signal(int sig) { (void)sig; stop = 1; }

/* ---- copy check ---- */

#define COPY_MAX 16384

static uint64_t copies[MAX_THREADS], copies_bad[MAX_THREADS];

static void *copier(void *arg)
{
    int tid = (int)(intptr_t)arg;
    static __thread uint8_t src[COPY_MAX + 64], dst[COPY_MAX + 64];
    uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(tid + 1);
    for (uint64_t n = 0; !stop; n++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        size_t len = 1 + (size_t)(x % COPY_MAX);
        size_t so = (size_t)(x >> 20) % 64, doff = (size_t)(x >> 30) % 64;
        uint8_t seed = (uint8_t)(x >> 40);
        for (size_t i = 0; i < len; i++)
            src[so + i] = (uint8_t)(seed + i * 7);
        memset(dst, 0xa5, sizeof dst);
        memcpy(dst + doff, src + so, len);
        for (size_t i = 0; i < len; i++) {
            if (dst[doff + i] != (uint8_t)(seed + i * 7)) {
                copies_bad[tid]++;
                pthread_mutex_lock(&out_lock);
                if (reports++ < MAX_REPORTS) {
                    printf("FRESHCHECK: BAD copy thread %d: %zu bytes from +%zu to +%zu: byte %zu is"
                           " %02x, not %02x; 16 bytes there:", tid, len, so, doff, i,
                           dst[doff + i], (uint8_t)(seed + i * 7));
                    for (size_t k = i & ~(size_t)15; k < (i & ~(size_t)15) + 16 && k < len; k++)
                        printf(" %02x", dst[doff + k]);
                    printf("\n");
                    fflush(stdout);
                }
                pthread_mutex_unlock(&out_lock);
                break;
            }
        }
        copies[tid]++;
    }
    return NULL;
}

static int copy_check(int seconds, int threads)
{
    pthread_t t[MAX_THREADS];
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, copier, (void *)(intptr_t)i);
    for (int s = 0; s < seconds && !stop; s++)
        sleep(1);
    stop = 1;
    uint64_t n = 0, bad = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        n += copies[i];
        bad += copies_bad[i];
    }
    printf("FRESHCHECK: pid %d: copy: %" PRIu64 " copies, %" PRIu64 " wrong\n", (int)getpid(), n, bad);
    return bad ? 1 : 0;
}

/* ---- TLB shootdown check ---- */

static struct {
    volatile uint64_t *page;
    uint64_t ready, go, ack;   /* round numbers, one writer each */
} tlb;

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *tlb_writer(void *arg)
{
    pin((int)(intptr_t)arg);
    for (uint64_t r = 1; !stop; r++) {
        (void)tlb.page[0];   /* the translation is in this CPU's TLB now */
        __atomic_store_n(&tlb.ready, r, __ATOMIC_RELEASE);
        while (__atomic_load_n(&tlb.go, __ATOMIC_ACQUIRE) != r)
            if (stop)
                return NULL;
        tlb.page[0] = r;   /* after the other CPU's MADV_DONTNEED returned */
        __atomic_store_n(&tlb.ack, r, __ATOMIC_RELEASE);
    }
    return NULL;
}

static int tlb_check(int seconds)
{
    int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 2) {
        printf("FRESHCHECK: tlb: one CPU, nothing to check\n");
        return 0;
    }
    tlb.page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (tlb.page == MAP_FAILED)
        return 2;
    tlb.page[0] = 0;
    pin(0);
    pthread_t t;
    pthread_create(&t, NULL, tlb_writer, (void *)(intptr_t)1);
    time_t end = time(NULL) + seconds;
    uint64_t rounds = 0, lost = 0;
    for (uint64_t r = 1; !stop && time(NULL) < end; r++) {
        while (__atomic_load_n(&tlb.ready, __ATOMIC_ACQUIRE) != r)
            if (stop)
                goto out;
        madvise((void *)tlb.page, PAGE, MADV_DONTNEED);
        __atomic_store_n(&tlb.go, r, __ATOMIC_RELEASE);
        while (__atomic_load_n(&tlb.ack, __ATOMIC_ACQUIRE) != r)
            if (stop)
                goto out;
        uint64_t got = tlb.page[0];
        rounds++;
        if (got != r && lost++ < MAX_REPORTS)
            printf("FRESHCHECK: BAD tlb round %" PRIu64 ": the other CPU wrote %" PRIu64
                   " after MADV_DONTNEED, this CPU reads %" PRIu64 " (a stale TLB entry)\n",
                   r, r, got);
    }
out:
    stop = 1;
    pthread_join(t, NULL);
    printf("FRESHCHECK: pid %d: tlb: %" PRIu64 " rounds, %" PRIu64 " writes through a stale TLB entry\n",
           (int)getpid(), rounds, lost);
    return lost ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s SECONDS [THREADS]\n", argv[0]);
        return 2;
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    if (strcmp(argv[1], "tlb") == 0)
        return tlb_check(argc > 2 ? atoi(argv[2]) : 10);
    if (strcmp(argv[1], "copy") == 0) {
        int n = argc > 3 ? atoi(argv[3]) : 4;
        return copy_check(argc > 2 ? atoi(argv[2]) : 10, n < 1 || n > MAX_THREADS ? 4 : n);
    }
    int seconds = atoi(argv[1]);
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    if (threads < 1 || threads > MAX_THREADS)
        threads = 2;
    pthread_t t[MAX_THREADS];
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, churn, (void *)(intptr_t)i);
    for (int s = 0; s < seconds && !stop; s++)
        sleep(1);
    stop = 1;
    uint64_t checked = 0, bad = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        checked += pages_checked[i];
        bad += pages_bad[i];
    }
    printf("FRESHCHECK: pid %d: %" PRIu64 " pages checked, %" PRIu64 " damaged\n",
           (int)getpid(), checked, bad);
    return bad ? 1 : 0;
}
