/* One verifying O_DIRECT stream of the lifecycle job (job-lifecycle), timing each request
 * itself.
 *
 *   lcio STREAM DEV BS BLOCKS WINDOWFILE RESULTDIR
 *
 * Rewrites block i % BLOCKS of the stream's own area of DEV (its MiBs at (1 + 2*STREAM) MiB)
 * with the line "LC s<STREAM> i<i>\n" repeated, reads it back at once and compares. Each
 * pwrite and pread is timed with CLOCK_MONOTONIC: the guest job used to time whole `dd`
 * processes with /proc/uptime, and under emulation a process start alone cost more than the
 * stall it was meant to see.
 *
 * WINDOWFILE holds the name of the current window (the guest's main loop renames a new file
 * into place when dom0 names a new kind). When the name changes, every block written so far
 * must hold the last pattern written to it; then RESULTDIR/lc-res.<old window>.<STREAM>
 * gets "max_us errs bad n gap_us" (written to a temporary file and renamed, so the reader
 * never sees half a line): the window's longest single request (the check's reads
 * included), failed requests, mismatches, the loop's requests (the check's reads not
 * counted), and the longest time between two completions in the loop. The window "end"
 * ends the program.
 *
 * A failed request is counted and the loop goes on: whether the guest ever sees an error is
 * what the job is there to find out. LCIO_BUFFERED=1 in the environment opens DEV without
 * O_DIRECT, for a test on a file system that refuses it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NAME_MAX_LEN 64
/* errors printed per window: enough to say what failed, not a console flood when a disk
 * is gone for good */
#define ERRORS_SHOWN 3
/* requests at least this slow are printed with their time (CLOCK_MONOTONIC, which in the
 * guest runs beside the kernel log's timestamps), at most SLOW_SHOWN per window and then
 * each new longest: whether a window's longest request came at its start, in a burst or
 * alone says what held it, and the lab lines them up with the serves' hand-overs (10
 * upgrades of a disk are 10 or more slow requests per stream, beside the emulation's own) */
#define SLOW_US 100000u
#define SLOW_SHOWN 48

struct window {
	char name[NAME_MAX_LEN];
	uint64_t max_us, gap_us;
	unsigned long errs, bad, n, shown, slow;
};

static int stream;
static const char *disk_name;   /* the device's name, for the slow-request lines */

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* what `yes "LC s<stream> i<iter>" | head -c <bs>` writes */
static void fill(char *buf, size_t bs, long iter)
{
	char line[48];
	int len = snprintf(line, sizeof(line), "LC s%d i%ld\n", stream, iter);
	size_t off;

	for (off = 0; off < bs; off += (size_t)len)
		memcpy(buf + off, line, bs - off < (size_t)len ? bs - off : (size_t)len);
}

/* the current window's name, or "" when the file cannot be read (it is only ever
 * replaced by rename, so that means it is not there yet) */
static void read_window(const char *path, char *name)
{
	FILE *f = fopen(path, "r");

	name[0] = '\0';
	if (f == NULL)
		return;
	if (fgets(name, NAME_MAX_LEN, f) == NULL)
		name[0] = '\0';
	fclose(f);
	name[strcspn(name, "\n")] = '\0';
}

static void failed(struct window *w, const char *what, long block, ssize_t got, size_t bs)
{
	w->errs++;
	if (w->shown++ < ERRORS_SHOWN)
		fprintf(stderr, "lcio s%d: %s of block %ld: %s\n", stream, what, block,
			got < 0 ? strerror(errno) : got == (ssize_t)bs ? "?" : "short transfer");
	if (got < 0) {
		/* a disk that fails every request at once (blkfront gave it up) must not
		 * keep the guest's only vCPU busy: the main loop still has to report */
		struct timespec pause = {0, 10 * 1000 * 1000};

		nanosleep(&pause, NULL);
	}
}

/* one timed request; returns whether all of it was transferred */
static int timed_io(struct window *w, int wr, int fd, char *buf, size_t bs, off_t off,
		    long block, uint64_t *done)
{
	uint64_t t0 = now_us();
	ssize_t got = wr ? pwrite(fd, buf, bs, off) : pread(fd, buf, bs, off);
	uint64_t t1 = now_us();

	int longest = t1 - t0 > w->max_us;

	if (longest)
		w->max_us = t1 - t0;
	/* past SLOW_SHOWN, the window's new longest ones still (the one its figure reports) */
	if (t1 - t0 >= SLOW_US && (w->slow++ < SLOW_SHOWN || longest)) {
		/* and the wall clock it ended at (UTC, from Xen like dom0's), to line the
		 * request up with dom0's logs */
		struct timespec wall;
		struct tm tm;

		clock_gettime(CLOCK_REALTIME, &wall);
		gmtime_r(&wall.tv_sec, &tm);
		fprintf(stderr, "lcio s%d %s: %s of block %ld took %.1f ms, done at %.3f s "
			"(%02d:%02d:%02d.%03ld UTC) (%s %lu)\n",
			stream, disk_name, wr ? "write" : "read", block, (t1 - t0) / 1000.0, t1 / 1e6,
			tm.tm_hour, tm.tm_min, tm.tm_sec, wall.tv_nsec / 1000000,
			done != NULL ? "request" : "check after request", w->n);
	}
	if (done != NULL) {
		if (t1 - *done > w->gap_us)
			w->gap_us = t1 - *done;
		*done = t1;
	}
	if (got != (ssize_t)bs) {
		failed(w, wr ? "write" : "read", block, got, bs);
		return 0;
	}
	return 1;
}

static int report(const struct window *w, const char *dir)
{
	char path[4096], tmp[4200];
	FILE *f;

	snprintf(path, sizeof(path), "%s/lc-res.%s.%d", dir, w->name, stream);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (f == NULL) {
		perror(tmp);
		return -1;
	}
	fprintf(f, "%llu %lu %lu %lu %llu\n", (unsigned long long)w->max_us, w->errs, w->bad,
		w->n, (unsigned long long)w->gap_us);
	if (fclose(f) != 0 || rename(tmp, path) != 0) {
		perror(path);
		return -1;
	}
	return 0;
}

/* O_DIRECT, unless LCIO_BUFFERED=1 (a host test on a file system without it) */
static int open_flags(void)
{
	const char *buffered = getenv("LCIO_BUFFERED");

	return buffered != NULL && strcmp(buffered, "1") == 0 ? O_RDWR : O_RDWR | O_DIRECT;
}

static int64_t wall_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* lcio clock DEV ROUNDS: how far dom0's wall clock is ahead of ours, so that the lab can
 * line our slow requests up with the serves' hand-over windows (a PV guest's clock was
 * found ~0.2 s behind dom0's). Each round writes "lc-clock-ping SEQ" to DEV's second page;
 * dom0 answers on the third page with "lc-clock-pong SEQ NS", its CLOCK_REALTIME when it
 * saw the ping. As NTP: offset = NS - (sent + received) / 2, within half the round trip;
 * the shortest round trip's is printed. */
static int clock_sync(const char *dev, int rounds)
{
	char *buf;
	int fd = open(dev, open_flags()), seq, got = 0;
	int64_t best_rtt = INT64_MAX, best_offset = 0;

	if (fd < 0) {
		perror(dev);
		return 1;
	}
	if (posix_memalign((void **)&buf, 4096, 4096)) {
		fprintf(stderr, "lcio: out of memory\n");
		return 1;
	}
	for (seq = 1; seq <= rounds; seq++) {
		uint64_t deadline = now_us() + 5000000u;
		int64_t sent;

		memset(buf, 0, 4096);
		snprintf(buf, 4096, "lc-clock-ping %d\n", seq);
		sent = wall_ns();
		if (pwrite(fd, buf, 4096, 4096) != 4096)
			break;
		while (now_us() < deadline) {
			long long theirs;
			int echoed;

			if (pread(fd, buf, 4096, 8192) != 4096)
				break;
			buf[4095] = '\0';
			if (sscanf(buf, "lc-clock-pong %d %lld", &echoed, &theirs) == 2 && echoed == seq) {
				int64_t received = wall_ns();

				if (received - sent < best_rtt) {
					best_rtt = received - sent;
					best_offset = theirs - (sent + received) / 2;
				}
				got++;
				break;
			}
		}
	}
	if (got)
		fprintf(stderr, "lcio clock: dom0 is %.1f ms ahead of the guest, within %.1f ms "
			"(best of %d round trips)\n", best_offset / 1e6, best_rtt / 2e6, got);
	else
		fprintf(stderr, "lcio clock: no answer from dom0\n");
	close(fd);
	free(buf);
	return got ? 0 : 1;
}

int main(int argc, char **argv)
{
	const char *dev, *winfile, *resdir;
	size_t bs;
	long blocks, iter, k, *last;
	off_t first;
	char *wbuf, *rbuf, name[NAME_MAX_LEN];
	struct window w;
	uint64_t done;
	int fd, ok;

	if (argc == 4 && strcmp(argv[1], "clock") == 0)
		return clock_sync(argv[2], atoi(argv[3]));
	if (argc != 7) {
		fprintf(stderr, "usage: lcio STREAM DEV BS BLOCKS WINDOWFILE RESULTDIR\n"
			"       lcio clock DEV ROUNDS\n");
		return 2;
	}
	stream = atoi(argv[1]);
	dev = argv[2];
	disk_name = strrchr(dev, '/') != NULL ? strrchr(dev, '/') + 1 : dev;
	bs = strtoul(argv[3], NULL, 0);
	blocks = atol(argv[4]);
	winfile = argv[5];
	resdir = argv[6];
	/* the stream's area is 2 MiB: its blocks must fit */
	if (stream < 0 || bs < 512 || bs % 512 || blocks < 1 || (off_t)bs * blocks > (2 << 20)) {
		fprintf(stderr, "lcio: bad stream, block size or block count\n");
		return 2;
	}
	first = (off_t)(1 + 2 * stream) << 20;
	fd = open(dev, open_flags());
	if (fd < 0) {
		perror(dev);
		return 1;
	}
	/* O_DIRECT wants buffers aligned to the logical block size; a page covers every disk */
	if (posix_memalign((void **)&wbuf, 4096, bs) || posix_memalign((void **)&rbuf, 4096, bs)) {
		fprintf(stderr, "lcio: out of memory\n");
		return 1;
	}
	/* the iteration whose pattern each block last got, -1: never written */
	last = malloc(sizeof(*last) * (size_t)blocks);
	if (last == NULL) {
		fprintf(stderr, "lcio: out of memory\n");
		return 1;
	}
	for (k = 0; k < blocks; k++)
		last[k] = -1;

	memset(&w, 0, sizeof(w));
	while (read_window(winfile, w.name), w.name[0] == '\0')
		usleep(10000);
	done = now_us();
	for (iter = 0;; iter++) {
		read_window(winfile, name);
		if (name[0] != '\0' && strcmp(name, w.name) != 0) {
			/* the window closed: check every block, report, start the next one */
			for (k = 0; k < blocks; k++) {
				if (last[k] < 0)
					continue;
				if (!timed_io(&w, 0, fd, rbuf, bs, first + (off_t)bs * k, k, NULL))
					continue;
				fill(wbuf, bs, last[k]);
				if (memcmp(wbuf, rbuf, bs) != 0) {
					w.bad++;
					fprintf(stderr, "lcio s%d: block %ld does not hold i%ld\n",
						stream, k, last[k]);
				}
			}
			if (report(&w, resdir) != 0)
				return 1;
			if (strcmp(name, "end") == 0)
				break;
			memset(&w, 0, sizeof(w));
			strcpy(w.name, name);
			/* the check's reads are no gap of the loop's */
			done = now_us();
		}
		k = iter % blocks;
		fill(wbuf, bs, iter);
		last[k] = iter;
		w.n += 2;
		/* the read goes out even after a failed write: each is a request to watch */
		ok = timed_io(&w, 1, fd, wbuf, bs, first + (off_t)bs * k, k, &done);
		ok &= timed_io(&w, 0, fd, rbuf, bs, first + (off_t)bs * k, k, &done);
		if (ok && memcmp(wbuf, rbuf, bs) != 0) {
			w.bad++;
			if (w.shown++ < ERRORS_SHOWN)
				fprintf(stderr, "lcio s%d: block %ld read back other bytes than i%ld\n",
					stream, k, iter);
		}
	}
	close(fd);
	return 0;
}
