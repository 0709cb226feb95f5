/* sink: UDP sink (and optional echo) for the relay benchmark.
 *
 *   sink --listen HOST:PORT [--echo | --tunnel] [--batch 64] [--max-time 600]
 *
 * Receives with recvmmsg and counts datagrams and bytes per marker (the first payload byte,
 * see blast.c), with the monotonic time of the first and last batch holding each marker.
 * Prints "ready" once bound; prints the counters as one JSON line on SIGUSR1 (and keeps
 * running) and on SIGTERM/SIGINT or after --max-time (and exits).
 * --echo sends every datagram back to its source (sendmmsg), for round-trip runs.
 * --tunnel: instead of UDP, play the server end of relay's multiplexed tunnel (SOCKS5
 * method 0x00, CMD 0xFA) on a TCP listen socket: take one connection and count the
 * datagrams of the frames it carries, as the UDP mode counts datagrams (the benchmark of
 * tunnel-client alone, bench/bench_tunnel.py --stages).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <poll.h>
#include <netinet/tcp.h>
#include <unistd.h>

#include "hostport.h"

#define MAX_BATCH 256
#define SLOT_BYTES 65536

static volatile sig_atomic_t want_report, want_exit;

static void on_usr1(int sig) { (void)sig; want_report = 1; }
static void on_term(int sig) { (void)sig; want_exit = 1; }

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void usage(const char *msg)
{
    fprintf(stderr, "sink: %s\n", msg);
    exit(2);
}

static void die(const char *what)
{
    fprintf(stderr, "sink: %s: %s\n", what, strerror(errno));
    exit(2);
}

static double count[256], bytes[256], first[256], last[256];
static double echoed, echo_errors, batches;

static void report(void)
{
    printf("{\"markers\": {");
    int sep = 0;
    for (int m = 0; m < 256; m++) {
        if (count[m] == 0)
            continue;
        printf("%s\"%d\": {\"count\": %.0f, \"bytes\": %.0f, \"first\": %.6f, \"last\": %.6f}",
               sep ? ", " : "", m, count[m], bytes[m], first[m], last[m]);
        sep = 1;
    }
    printf("}, \"echoed\": %.0f, \"echo_errors\": %.0f, \"batches\": %.0f, \"now\": %.6f}\n",
           echoed, echo_errors, batches, now_s());
    fflush(stdout);
}

static void count_one(const unsigned char *data, size_t len, double t)
{
    int m = len ? data[0] : 0;
    if (count[m] == 0) first[m] = t;
    count[m]++;
    bytes[m] += (double)len;
    last[m] = t;
}

/* Reads exactly n bytes of the handshake (blocking with the receive timeout); 0 on success. */
static int read_full(int fd, unsigned char *p, size_t n)
{
    size_t got = 0;
    while (got < n && !want_exit) {
        ssize_t r = recv(fd, p + got, n - got, 0);
        if (r == 0) return -1;
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -1;
        }
        got += (size_t)r;
    }
    return got == n ? 0 : -1;
}

/* Server end of relay's multiplexed tunnel, no authentication: greeting, CMD 0xFA request,
 * reply; then frames RSV(2, payload length) FRAG ATYP ADDR PORT FLOW(4) DATA, counted. */
static int tunnel_main(int lfd, double end)
{
    int fd = -1;
    while (fd < 0 && !want_exit) {
        struct pollfd p = {lfd, POLLIN, 0};
        if (want_report) { want_report = 0; report(); }
        if (poll(&p, 1, 50) > 0)
            fd = accept(lfd, NULL, NULL);
        if (now_s() > end) return 0;
    }
    if (fd < 0) return 0;
    struct timeval tv = {0, 50000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    unsigned char h[300];
    if (read_full(fd, h, 2) || h[0] != 5 || read_full(fd, h + 2, h[1])) return 1;
    if (!memchr(h + 2, 0, h[1])) { fprintf(stderr, "sink: client does not offer method 0\n"); return 1; }
    static const unsigned char choice[2] = {5, 0};
    if (send(fd, choice, 2, MSG_NOSIGNAL) != 2) return 1;
    if (read_full(fd, h, 4) || h[1] != 0xFA) { fprintf(stderr, "sink: not a CMD 0xFA request\n"); return 1; }
    size_t alen = h[3] == 1 ? 4 : h[3] == 4 ? 16 : 0;
    if (h[3] == 3) { if (read_full(fd, h + 4, 1)) return 1; alen = h[4]; }
    if (read_full(fd, h + 5, alen + 2)) return 1;
    static const unsigned char reply[10] = {5, 0, 0, 1, 0, 0, 0, 0, 0, 0};
    if (send(fd, reply, sizeof reply, MSG_NOSIGNAL) != sizeof reply) return 1;

    size_t cap = 4 << 20, have = 0;
    unsigned char *buf = malloc(cap);
    if (!buf) die("malloc");
    while (!want_exit) {
        if (want_report) { want_report = 0; report(); }
        ssize_t r = recv(fd, buf + have, cap - have, 0);
        double t = now_s();
        if (r == 0) break;
        if (r < 0) {
            if (errno != EINTR && errno != EAGAIN) break;
            if (t > end) break;
            continue;
        }
        batches++;
        have += (size_t)r;
        size_t pos = 0;
        while (have - pos >= 4) {
            const unsigned char *f = buf + pos;
            size_t al = f[3] == 1 ? 4 : f[3] == 4 ? 16 : (have - pos >= 5 ? 1 + (size_t)f[4] : 0);
            if (al == 0) break;
            size_t hl = 4 + al + 2 + 4, dl = ((size_t)f[0] << 8) | f[1];
            if (have - pos < hl + dl) break;
            count_one(f + hl, dl, t);
            pos += hl + dl;
        }
        memmove(buf, buf + pos, have - pos);
        have -= pos;
        if (t > end) break;
    }
    free(buf);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    const char *listen_s = NULL;
    long batch = 64;
    double max_time = 600;
    int echo = 0, tunnel = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) usage("missing value"); i++; } while (0)
        if (!strcmp(a, "--listen")) { NEEDV(); listen_s = v; }
        else if (!strcmp(a, "--batch")) { NEEDV(); batch = atol(v); }
        else if (!strcmp(a, "--max-time")) { NEEDV(); max_time = atof(v); }
        else if (!strcmp(a, "--echo")) echo = 1;
        else if (!strcmp(a, "--tunnel")) tunnel = 1;
        else { fprintf(stderr, "sink: unknown option %s\n", a); return 2; }
    }
    if (!listen_s) usage("--listen is required");
    if (batch < 1 || batch > MAX_BATCH) usage("--batch must be 1-256");
    if (max_time <= 0 || max_time > 3600) usage("--max-time must be in (0, 3600]");

    struct sockaddr_storage la;
    socklen_t llen = parse_hostport(listen_s, &la);
    int fd = socket(la.ss_family, tunnel ? SOCK_STREAM : SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    int one = 1, buf = 16 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    if (la.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    struct timeval tv = {0, 50000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (bind(fd, (struct sockaddr *)&la, llen) < 0) die("bind");
    if (tunnel && listen(fd, 4) < 0) die("listen");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);   /* no SA_RESTART: recvmmsg returns EINTR at once */
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    unsigned char *pool = malloc((size_t)batch * SLOT_BYTES);
    if (!pool) die("malloc");
    static struct mmsghdr rm[MAX_BATCH], sm[MAX_BATCH];
    static struct iovec riov[MAX_BATCH], siov[MAX_BATCH];
    static struct sockaddr_storage names[MAX_BATCH];
    for (int i = 0; i < batch; i++) {
        riov[i].iov_base = pool + (size_t)i * SLOT_BYTES;
        riov[i].iov_len = SLOT_BYTES;
        rm[i].msg_hdr.msg_iov = &riov[i];
        rm[i].msg_hdr.msg_iovlen = 1;
        rm[i].msg_hdr.msg_name = &names[i];
        siov[i].iov_base = riov[i].iov_base;
        sm[i].msg_hdr.msg_iov = &siov[i];
        sm[i].msg_hdr.msg_iovlen = 1;
        sm[i].msg_hdr.msg_name = &names[i];
    }

    printf("ready\n");
    fflush(stdout);
    double end = now_s() + max_time;
    if (tunnel) {
        int rc = tunnel_main(fd, end);
        report();
        return rc;
    }
    while (!want_exit) {
        if (want_report) {
            want_report = 0;
            report();
        }
        for (int i = 0; i < batch; i++)
            rm[i].msg_hdr.msg_namelen = sizeof names[i];
        int n = recvmmsg(fd, rm, (unsigned)batch, MSG_WAITFORONE, NULL);
        double t = now_s();
        if (n <= 0) {
            if (t > end) break;
            continue;
        }
        batches++;
        for (int i = 0; i < n; i++)
            count_one(riov[i].iov_base, rm[i].msg_len, t);
        if (echo) {
            for (int i = 0; i < n; i++) {
                siov[i].iov_len = rm[i].msg_len;
                sm[i].msg_hdr.msg_namelen = rm[i].msg_hdr.msg_namelen;
            }
            int done = 0;
            while (done < n) {
                int k = sendmmsg(fd, sm + done, (unsigned)(n - done), MSG_DONTWAIT);
                if (k <= 0) {
                    echo_errors += n - done;
                    break;
                }
                done += k;
            }
            echoed += done;
        }
        if (t > end) break;
    }
    report();
    return 0;
}
