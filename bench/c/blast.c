/* blast: UDP load generator for the relay benchmark.
 *
 *   blast --dst HOST:PORT [--size 64] [--flows 1] [--batch 64] [--count N] [--duration S]
 *         [--rate PPS] [--warmup N] [--marker M] [--sync] [--echo] [--gso]
 *         [--tunnel HOST:PORT]
 *
 * Opens one UDP socket per flow (distinct source ports), connected to --dst, and sends
 * batches with sendmmsg, round robin over the flows (one batch of --batch datagrams per
 * flow in turn). Every datagram's first byte is --marker so the sink can tell phases
 * apart; the warm-up datagrams (--warmup per flow, sent first) carry marker 0.
 * --rate paces batches with a token bucket (0 = full rate). The run always stops after
 * --count datagrams or --duration seconds, whichever comes first.
 * --sync: after the warm-up print "warm" and wait for a line on stdin before the measured
 * phase (the harness snapshots CPU counters in between).
 * --echo: also count the replies arriving on the flow sockets (round trips).
 * --gso: send each batch entry as one UDP_SEGMENT buffer of up to 64 datagrams.
 * --tunnel: instead of UDP, play the client end of relay's multiplexed tunnel against the
 * tunnel-server at HOST:PORT (SOCKS5 method 0x00, CMD 0xFA): frames to --dst, flow ids
 * 1..--flows, one send() of --batch frames per flow in turn (the benchmark of
 * tunnel-server alone, bench/bench_tunnel.py --stages); --rate paces the batches.
 * Prints one JSON object on stdout at the end.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

#define MAX_BATCH 256
#define GSO_MAX_SEGS 64
#define GSO_MAX_BYTES 65000

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_until(double t)
{
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static void die(const char *what)
{
    fprintf(stderr, "blast: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void usage(const char *msg)
{
    fprintf(stderr, "blast: %s\n", msg);
    exit(2);
}

#include "hostport.h"

/* A destination: parse_hostport's HOST:PORT, port 0 refused (nothing listens there). */
static socklen_t parse_dest(const char *s, struct sockaddr_storage *out)
{
    const char *colon = strrchr(s, ':');
    long port = colon ? strtol(colon + 1, NULL, 10) : 0;
    if (colon && (port <= 0 || port > 65535))
        usage("port must be 1-65535");
    return parse_hostport(s, out);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Reads the replies waiting on fd; returns how many carry `marker` (adds their bytes). */
static long drain(int fd, struct mmsghdr *msgs, int batch, int marker, long *bytes)
{
    long got = 0;
    for (;;) {
        int n = recvmmsg(fd, msgs, batch, MSG_DONTWAIT, NULL);
        if (n <= 0)
            break;
        for (int i = 0; i < n; i++) {
            const unsigned char *b = msgs[i].msg_hdr.msg_iov->iov_base;
            if (msgs[i].msg_len > 0 && b[0] == marker) {
                got++;
                *bytes += msgs[i].msg_len;
            }
        }
        if (n < batch)
            break;
    }
    return got;
}

/* --sync: report the end of the warm-up, wait for the go line; nonzero if stdin closed. */
static int wait_go(long warm_sent)
{
    printf("warm %ld\n", warm_sent);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) {
        fprintf(stderr, "blast: stdin closed before go\n");
        return 1;
    }
    return 0;
}

/* Sends all of p (blocking, bounded by `until`); 0 when it all went. */
static int send_full(int fd, const unsigned char *p, size_t n, double until)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = send(fd, p + done, n - done, MSG_NOSIGNAL);
        if (r < 0) {
            if ((errno == EAGAIN || errno == EINTR) && now_s() < until) continue;
            return -1;
        }
        done += (size_t)r;
    }
    return 0;
}

static int recv_full(int fd, unsigned char *p, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, p + got, n - got, 0);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

/* Frames of `batch` datagrams of `size` bytes to dst on flow id `flow`, marker first. */
static unsigned char *tunnel_frames(const struct sockaddr_storage *dst, uint32_t flow,
                                    long size, long batch, int marker, size_t *len)
{
    size_t alen = dst->ss_family == AF_INET ? 4 : 16, hl = 4 + alen + 2 + 4;
    unsigned char *b = malloc((hl + (size_t)size) * (size_t)batch), *o = b;
    if (!b) die("malloc");
    for (long i = 0; i < batch; i++) {
        o[0] = (unsigned char)(size >> 8);
        o[1] = (unsigned char)size;
        o[2] = 0;
        if (dst->ss_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)dst;
            o[3] = 1;
            memcpy(o + 4, &a->sin_addr, 4);
            memcpy(o + 8, &a->sin_port, 2);
        } else {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)dst;
            o[3] = 4;
            memcpy(o + 4, &a->sin6_addr, 16);
            memcpy(o + 20, &a->sin6_port, 2);
        }
        o[hl - 4] = (unsigned char)(flow >> 24);
        o[hl - 3] = (unsigned char)(flow >> 16);
        o[hl - 2] = (unsigned char)(flow >> 8);
        o[hl - 1] = (unsigned char)flow;
        for (long k = 0; k < size; k++)
            o[hl + (size_t)k] = (unsigned char)('a' + k % 26);
        o[hl] = (unsigned char)marker;
        o += hl + (size_t)size;
    }
    *len = (size_t)(o - b);
    return b;
}

static int tunnel_blast(const char *server_s, const struct sockaddr_storage *dst, long size,
                        long flows, long batch, double count, double duration, double rate,
                        long warmup, int marker, int sync)
{
    struct sockaddr_storage srv;
    socklen_t slen = parse_dest(server_s, &srv);
    int fd = socket(srv.ss_family, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    int one = 1, buf = 4 << 20;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&srv, slen) < 0) die("connect");
    static const unsigned char greet[3] = {5, 1, 0};
    static const unsigned char req[10] = {5, 0xFA, 0, 1, 0, 0, 0, 0, 0, 0};
    unsigned char h[32];
    if (send_full(fd, greet, 3, now_s() + 5) || recv_full(fd, h, 2) || h[0] != 5 || h[1] != 0)
        usage("tunnel server refused method 0x00 (no secret)");
    if (send_full(fd, req, sizeof req, now_s() + 5) || recv_full(fd, h, 4) || h[1] != 0)
        usage("tunnel server refused the CMD 0xFA request");
    if (recv_full(fd, h + 4, (h[3] == 4 ? 16 : 4) + 2)) die("tunnel reply");

    unsigned char **frames = calloc((size_t)flows, sizeof *frames);
    if (!frames) die("calloc");
    size_t flen = 0;
    for (long f = 0; f < flows; f++)
        frames[f] = tunnel_frames(dst, (uint32_t)f + 1, size, batch, marker, &flen);
    long warm_sent = 0;
    for (long f = 0; f < flows && warmup > 0; f++) {
        size_t wlen;
        unsigned char *w = tunnel_frames(dst, (uint32_t)f + 1, size, warmup, 0, &wlen);
        if (send_full(fd, w, wlen, now_s() + 5) == 0) warm_sent += warmup;
        free(w);
    }
    if (sync && wait_go(warm_sent))
        return 3;
    double sent = 0, t0 = now_s(), deadline = t0 + duration;
    long errors = 0, f = 0;
    int first_err = 0;
    while (sent < count) {
        if (rate > 0) {
            double due = t0 + sent / rate;
            if (due > deadline) break;
            if (due > now_s()) sleep_until(due);
        }
        if (send_full(fd, frames[f], flen, deadline + 5)) {
            errors++;
            first_err = errno;
            break;
        }
        sent += (double)batch;
        if (++f == flows) f = 0;
        if (now_s() >= deadline) break;
    }
    double elapsed = now_s() - t0;
    close(fd);
    printf("{\"sent\": %.0f, \"warm_sent\": %ld, \"elapsed\": %.6f, \"errors\": %ld, "
           "\"first_error\": \"%s\", \"replies\": 0, \"reply_bytes\": 0, \"size\": %ld, "
           "\"flows\": %ld, \"gso_segments\": 1}\n",
           sent, warm_sent, elapsed, errors, first_err ? strerror(first_err) : "", size, flows);
    return 0;
}

int main(int argc, char **argv)
{
    const char *dst_s = NULL, *tunnel_s = NULL;
    long size = 64, flows = 1, batch = 64, warmup = 0, marker = 1;
    double count = 1e12, duration = 1.0, rate = 0;
    int sync = 0, echo = 0, gso = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) usage("missing value"); i++; } while (0)
        if (!strcmp(a, "--dst")) { NEEDV(); dst_s = v; }
        else if (!strcmp(a, "--size")) { NEEDV(); size = atol(v); }
        else if (!strcmp(a, "--flows")) { NEEDV(); flows = atol(v); }
        else if (!strcmp(a, "--batch")) { NEEDV(); batch = atol(v); }
        else if (!strcmp(a, "--count")) { NEEDV(); count = atof(v); }
        else if (!strcmp(a, "--duration")) { NEEDV(); duration = atof(v); }
        else if (!strcmp(a, "--rate")) { NEEDV(); rate = atof(v); }
        else if (!strcmp(a, "--warmup")) { NEEDV(); warmup = atol(v); }
        else if (!strcmp(a, "--marker")) { NEEDV(); marker = atol(v); }
        else if (!strcmp(a, "--sync")) sync = 1;
        else if (!strcmp(a, "--echo")) echo = 1;
        else if (!strcmp(a, "--gso")) gso = 1;
        else if (!strcmp(a, "--tunnel")) { NEEDV(); tunnel_s = v; }
        else { fprintf(stderr, "blast: unknown option %s\n", a); return 2; }
    }
    if (!dst_s) usage("--dst is required");
    if (size < 1 || size > 65507) usage("--size must be 1-65507");
    if (flows < 1 || flows > 60000) usage("--flows must be 1-60000");
    if (batch < 1 || batch > MAX_BATCH) usage("--batch must be 1-256");
    if (marker < 1 || marker > 255) usage("--marker must be 1-255");
    if (duration <= 0 || duration > 600) usage("--duration must be in (0, 600]");
    if (count < 1) usage("--count must be >= 1");
    if (warmup < 0 || warmup > 1000) usage("--warmup must be 0-1000");

    struct sockaddr_storage dst;
    socklen_t dlen = parse_dest(dst_s, &dst);
    if (tunnel_s) {
        if (echo || gso) usage("--tunnel goes without --echo or --gso");
        if (size > 65535) usage("--size must be at most 65535 with --tunnel");
        return tunnel_blast(tunnel_s, &dst, size, flows, batch, count, duration, rate, warmup,
                            (int)marker, sync);
    }
    raise_nofile();

    int *fds = calloc((size_t)flows, sizeof(int));
    if (!fds) die("calloc");
    for (long f = 0; f < flows; f++) {
        int fd = socket(dst.ss_family, SOCK_DGRAM, 0);
        if (fd < 0) die("socket");
        int buf = 4 << 20;
        if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf) < 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
        if (echo) {
            int rb = flows > 64 ? (256 << 10) : (4 << 20);
            if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rb, sizeof rb) < 0)
                setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rb, sizeof rb);
        }
        if (connect(fd, (struct sockaddr *)&dst, dlen) < 0) die("connect");
        fds[f] = fd;
    }

    /* Payloads: plain mode sends `batch` datagrams of `size` bytes per call; GSO mode sends
     * `batch` buffers of `segs` segments each (every segment starts with the marker). */
    long segs = 1;
    if (gso) {
        segs = GSO_MAX_BYTES / size;
        if (segs > GSO_MAX_SEGS) segs = GSO_MAX_SEGS;
        if (segs < 2) usage("--gso needs --size small enough for 2 segments per buffer");
        int seg = (int)size;
        for (long f = 0; f < flows; f++)
            if (setsockopt(fds[f], SOL_UDP, UDP_SEGMENT, &seg, sizeof seg) < 0)
                die("setsockopt UDP_SEGMENT");
    }
    size_t buflen = (size_t)(size * segs);
    unsigned char *payload = malloc(buflen);
    unsigned char *warm = malloc((size_t)size);
    if (!payload || !warm) die("malloc");
    for (size_t k = 0; k < buflen; k++)
        payload[k] = (unsigned char)('a' + k % 26);
    for (long s = 0; s < segs; s++)
        payload[s * size] = (unsigned char)marker;
    memset(warm, 'w', (size_t)size);
    warm[0] = 0;

    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    struct mmsghdr rmsgs[MAX_BATCH];
    struct iovec riov[MAX_BATCH];
    static unsigned char rbuf[MAX_BATCH][2048];
    memset(msgs, 0, sizeof msgs);
    memset(rmsgs, 0, sizeof rmsgs);
    for (int i = 0; i < MAX_BATCH; i++) {
        iov[i].iov_base = payload;
        iov[i].iov_len = buflen;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        riov[i].iov_base = rbuf[i];
        riov[i].iov_len = sizeof rbuf[i];
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
    }

    long errors = 0, consecutive = 0;
    int first_err = 0;
    long warm_sent = 0;
    if (warmup > 0) {
        /* Turn GSO off for the single warm-up datagrams. */
        int zero = 0;
        for (long w = 0; w < warmup; w++)
            for (long f = 0; f < flows; f++) {
                if (gso) setsockopt(fds[f], SOL_UDP, UDP_SEGMENT, &zero, sizeof zero);
                if (send(fds[f], warm, (size_t)size, 0) == size)
                    warm_sent++;
                else if (!first_err)
                    first_err = errno;
            }
        if (gso) {
            int seg = (int)size;
            for (long f = 0; f < flows; f++)
                setsockopt(fds[f], SOL_UDP, UDP_SEGMENT, &seg, sizeof seg);
        }
    }
    if (sync && wait_go(warm_sent))
        return 3;
    if (echo) {
        long junk = 0;
        for (long f = 0; f < flows; f++)
            drain(fds[f], rmsgs, (int)batch, 0, &junk);
    }

    double sent = 0, replies = 0;
    long reply_bytes = 0;
    double t0 = now_s(), deadline = t0 + duration, t = t0;
    long f = 0;
    while (sent < count) {
        if (rate > 0) {
            double due = t0 + sent / rate;
            if (due > deadline) break;
            if (due > t) sleep_until(due);
        }
        int want = (int)batch;
        double left = (count - sent) / (double)segs;
        if (left < want) want = left < 1 ? 1 : (int)left;
        int n = sendmmsg(fds[f], msgs, (unsigned)want, 0);
        if (n > 0) {
            sent += (double)n * (double)segs;
            consecutive = 0;
        } else if (n < 0) {
            errors++;
            if (!first_err) first_err = errno;
            /* ECONNREFUSED: an ICMP error from an earlier datagram; the next send works. */
            if (++consecutive > 100000) break;
        }
        if (echo) {
            long b = 0;
            replies += (double)drain(fds[f], rmsgs, (int)batch, (int)marker, &b);
            reply_bytes += b;
        }
        if (++f == flows) f = 0;
        t = now_s();
        if (t >= deadline) break;
    }
    double elapsed = now_s() - t0;

    if (echo) {
        /* Collect the replies still in flight: stop after 150 ms without any, 1 s at most. */
        struct pollfd *pfd = calloc((size_t)flows, sizeof *pfd);
        if (!pfd) die("calloc");
        for (long k = 0; k < flows; k++) {
            pfd[k].fd = fds[k];
            pfd[k].events = POLLIN;
        }
        double end = now_s() + 1.0;
        while (now_s() < end) {
            int r = poll(pfd, (nfds_t)flows, 150);
            if (r <= 0) break;
            for (long k = 0; k < flows; k++)
                if (pfd[k].revents & POLLIN) {
                    long b = 0;
                    replies += (double)drain(fds[k], rmsgs, (int)batch, (int)marker, &b);
                    reply_bytes += b;
                }
        }
        free(pfd);
    }

    printf("{\"sent\": %.0f, \"warm_sent\": %ld, \"elapsed\": %.6f, \"errors\": %ld, "
           "\"first_error\": \"%s\", \"replies\": %.0f, \"reply_bytes\": %ld, \"size\": %ld, "
           "\"flows\": %ld, \"gso_segments\": %ld}\n",
           sent, warm_sent, elapsed, errors, first_err ? strerror(first_err) : "",
           replies, reply_bytes, size, flows, segs);
    return 0;
}
