/*
 * /init of the guest used by tests/qemu_estimate.rs.
 *
 * Reads its parameters from the kernel command line:
 *   alloc_mib=N    memory to allocate and touch once (every page made non-zero)
 *   wss_mib=N      working set: the first N MiB of the allocation are rewritten, cyclically
 *   dirty_mib_s=N  pages of the working set dirtied per second, in MiB/s (0: idle)
 *   seed=N         what the allocation is filled with (default 0); guests given different
 *                  seeds hold no page of it in common, guests given the same seed the same
 *                  pages (wherever the guest kernel places them)
 *   shared_mib=N   also (first) N MiB whose pages hold a function of their guest-physical
 *                  frame number only (read from /proc/self/pagemap): two guests that both
 *                  have frame p in it hold the same page at p, so their aligned 64 KiB
 *                  regions match wherever both have all 16 frames; this is memory a
 *                  migration target can already hold (default 0)
 *
 * Dirtying walks the working set page by page, so in t seconds it dirties
 * min(rate * t, wss) distinct pages: exactly the bound the estimate model assumes.
 * Prints "cg-dirtier: ready" on the console when the allocation is touched, then once a
 * second the rate it actually achieved.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Value of "key=" in the command line, or def. */
static long param(const char *cmdline, const char *key, long def)
{
	size_t klen = strlen(key);
	const char *p = cmdline;
	while ((p = strstr(p, key)) != NULL) {
		if ((p == cmdline || p[-1] == ' ') && p[klen] == '=')
			return strtol(p + klen + 1, NULL, 10);
		p += klen;
	}
	return def;
}

static void console(void)
{
	int fd = open("/dev/console", O_RDWR);
	if (fd < 0)
		fd = open("/dev/ttyS0", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
}

/* Allocates and touches mib MiB, then writes into each page a value of its frame number. */
static void shared(long mib)
{
	size_t len = (size_t)mib << 20, pages = len / PAGE;
	unsigned char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		printf("cg-dirtier: mmap shared %ld MiB failed: %s\n", mib, strerror(errno));
		return;
	}
	madvise(buf, len, MADV_NOHUGEPAGE);
	for (size_t i = 0; i < pages; i++)
		buf[i * PAGE] = 1;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	size_t missing = 0;
	for (size_t i = 0; i < pages; i++) {
		uint64_t e = 0;
		off_t at = (off_t)((uintptr_t)(buf + i * PAGE) / PAGE) * 8;
		if (fd < 0 || pread(fd, &e, 8, at) != 8 || !(e >> 63) ||
		    (e & ((1ULL << 55) - 1)) == 0) {
			missing++;
			continue;
		}
		uint64_t pfn = e & ((1ULL << 55) - 1);
		uint64_t v[4] = {0xc6a4a7935bd1e995ULL * (pfn + 1), pfn, ~pfn, 0x5eed5eed5eedULL};
		memcpy(buf + i * PAGE, v, sizeof v);
	}
	if (fd >= 0)
		close(fd);
	printf("cg-dirtier: shared_mib=%ld (%zu pages without a frame number)\n", mib, missing);
}

static void idle_forever(void)
{
	for (;;)
		pause();
}

int main(void)
{
	char cmdline[4096] = "";
	mkdir("/proc", 0755);
	mkdir("/dev", 0755);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	console();

	int fd = open("/proc/cmdline", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
		if (n > 0)
			cmdline[n] = 0;
		close(fd);
	}
	long alloc_mib = param(cmdline, "alloc_mib", 64);
	long wss_mib = param(cmdline, "wss_mib", alloc_mib);
	long rate_mib = param(cmdline, "dirty_mib_s", 0);
	uint64_t seed = (uint64_t)param(cmdline, "seed", 0);
	if (wss_mib > alloc_mib)
		wss_mib = alloc_mib;
	long shared_mib = param(cmdline, "shared_mib", 0);
	if (shared_mib > 0)
		shared(shared_mib);

	size_t len = (size_t)alloc_mib << 20;
	unsigned char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		printf("cg-dirtier: mmap %ld MiB failed: %s\n", alloc_mib, strerror(errno));
		idle_forever();
	}
	/* Guest pages are what the host sees as pages: 4 KiB, no huge pages in the guest. */
	madvise(buf, len, MADV_NOHUGEPAGE);
	size_t pages = len / PAGE;
	for (size_t i = 0; i < pages; i++) {
		uint64_t v = 0x9e3779b97f4a7c15ULL * (i + 1 + (seed << 40));
		memcpy(buf + i * PAGE, &v, sizeof v);
	}
	printf("cg-dirtier: ready alloc_mib=%ld wss_mib=%ld dirty_mib_s=%ld seed=%lu\n",
	       alloc_mib, wss_mib, rate_mib, (unsigned long)seed);
	if (rate_mib <= 0 || wss_mib <= 0)
		idle_forever();

	size_t wss_pages = (size_t)wss_mib << 8;
	double pages_per_s = (double)rate_mib * 256.0;
	double start = now_s(), report = start + 1.0;
	uint64_t done = 0, written = 0, written_at_report = 0;
	size_t idx = 0;
	unsigned char stamp = 1;
	for (;;) {
		double t = now_s();
		uint64_t due = (uint64_t)((t - start) * pages_per_s);
		/* After a stall (vCPU descheduled) catch up at most 100 ms worth, no burst. */
		uint64_t max_backlog = (uint64_t)(pages_per_s / 10) + 1;
		if (due > done + max_backlog)
			done = due - max_backlog;
		while (done < due) {
			buf[idx * PAGE + 64] = stamp;
			if (++idx == wss_pages) {
				idx = 0;
				stamp = (unsigned char)(stamp == 255 ? 1 : stamp + 1);
			}
			done++;
			written++;
		}
		if (t >= report) {
			printf("cg-dirtier: rate_mib_s=%.1f\n",
			       (double)(written - written_at_report) / 256.0 / (t - report + 1.0));
			written_at_report = written;
			report = t + 1.0;
		}
		struct timespec ts = {0, 1000000};
		nanosleep(&ts, NULL);
	}
}
