/* Random O_DIRECT reads submitted at once through Linux native AIO (io_submit; no libaio needed), against the
 * reader threads of flash_store/io_engine.py: what a selective sparse read of one layer (dozens of 1-3 KB runs)
 * could cost if every run were in flight together. A measurement, not part of flashlm.
 *
 *   gcc -O2 labs/aio_reads.c -o /tmp/aio_reads
 *   dd if=/dev/urandom of=/tmp/big.bin bs=1M count=256; sync; echo 3 > /proc/sys/vm/drop_caches
 *   /tmp/aio_reads /tmp/big.bin N_READS READ_BYTES REPEATS      (e.g. 84 3072 50)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s FILE N_READS READ_BYTES REPEATS\n", argv[0]); return 2; }
    int n = atoi(argv[2]), len = atoi(argv[3]), reps = atoi(argv[4]);
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) || n < 1 || len < 512 || len % 512) { perror("open"); return 2; }
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, n, &ctx)) { perror("io_setup"); return 1; }
    char *buf;
    if (posix_memalign((void **)&buf, 4096, (size_t)n * len)) return 1;
    struct iocb *cbs = calloc(n, sizeof *cbs), **ptrs = malloc(n * sizeof *ptrs);
    struct io_event *ev = malloc(n * sizeof *ev);
    long sectors = st.st_size / 512 - len / 512;
    double total = 0;
    srand(1);
    for (int r = 0; r < reps; r++) {
        for (int i = 0; i < n; i++) {
            memset(&cbs[i], 0, sizeof cbs[i]);
            cbs[i].aio_fildes = fd;
            cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
            cbs[i].aio_buf = (unsigned long)(buf + (size_t)i * len);
            cbs[i].aio_nbytes = len;
            cbs[i].aio_offset = (long long)(rand() % sectors) * 512;
            ptrs[i] = &cbs[i];
        }
        double t = now();
        if (syscall(SYS_io_submit, ctx, n, ptrs) != n) { perror("io_submit"); return 1; }
        for (int got = 0; got < n;) {
            int g = syscall(SYS_io_getevents, ctx, 1, n - got, ev, NULL);
            if (g < 0) { perror("io_getevents"); return 1; }
            for (int k = 0; k < g; k++)
                if (ev[k].res != len) { fprintf(stderr, "short read %lld\n", (long long)ev[k].res); return 1; }
            got += g;
        }
        total += now() - t;
    }
    printf("%d reads of %d bytes at once: %.3f ms per batch, %.1f us per read\n", n, len, total / reps * 1e3,
           total / reps / n * 1e6);
    return 0;
}
