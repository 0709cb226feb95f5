/* pingpong: UDP round-trip latency client for the relay benchmark.
 *
 *   pingpong --dst HOST:PORT [--size 64] [--rate 1000] [--count N] [--duration S]
 *            [--inflight 64] [--timeout-ms 200] [--warmup 10] [--marker 1] [--dump FILE]
 *
 * One UDP socket connected to --dst (an echo: bench/c/sink.c --echo, directly or through
 * a relay). Sends one datagram every 1/--rate seconds (paced against the start time, so a
 * late wake-up sends what is due at once, up to 16 behind), each carrying a sequence number and its
 * CLOCK_MONOTONIC send time; every echo that comes back is matched by its sequence number
 * and its round-trip time recorded. At most --inflight datagrams are outstanding (a full
 * window waits for echoes, so the rate falls rather than the window growing); one without
 * an echo after --timeout-ms counts as lost, a late or repeated echo is counted and not
 * recorded; one whose send failed counts in send_errors (sent = received + lost +
 * send_errors). Stops after --count datagrams or --duration seconds, whichever comes first,
 * then waits --timeout-ms for the last echoes.
 * Payload: byte 0 = --marker (the sink counts per marker; the --warmup datagrams sent first
 * carry 0 and are not recorded), bytes 4-11 the sequence number, 12-19 the send time (ns).
 * Prints one JSON object: counts, "rate" (datagrams/s from the first to the last send:
 * below --rate when the window was full) and p50/p90/p99/p99.9/max of the recorded round trips (us,
 * nearest rank on the sorted samples: the value at index ceil(q*n)-1); --dump writes the
 * samples (uint32 ns, native order, in arrival order) for pooling rounds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "hostport.h"

#define RING 65536              /* outstanding-datagram slots: bounds --inflight */
#define MAX_SIZE 65000
#define HDR 20

struct slot {
    uint64_t seq;               /* seq + 1 while outstanding, 0 when free */
    uint64_t sent_ns;
};

static struct slot ring[RING];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void usage(const char *msg)
{
    fprintf(stderr, "pingpong: %s\n", msg);
    exit(2);
}

static void die(const char *what)
{
    fprintf(stderr, "pingpong: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest rank: the sample at index ceil(q * n) - 1 of the sorted samples. */
static double pct_us(const uint32_t *sorted, size_t n, double q)
{
    if (!n)
        return -1;
    double want = q * (double)n;
    size_t k = (size_t)want;
    if ((double)k < want)
        k++;                    /* ceil */
    if (k < 1)
        k = 1;
    if (k > n)
        k = n;
    return sorted[k - 1] / 1000.0;
}

int main(int argc, char **argv)
{
    const char *dst_s = NULL, *dump = NULL;
    long size = 64, inflight = 64, warmup = 10, marker = 1;
    double rate = 1000, duration = 1.0, timeout_ms = 200;
    long long count = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) usage("missing value"); i++; } while (0)
        if (!strcmp(a, "--dst")) { NEEDV(); dst_s = v; }
        else if (!strcmp(a, "--size")) { NEEDV(); size = atol(v); }
        else if (!strcmp(a, "--rate")) { NEEDV(); rate = atof(v); }
        else if (!strcmp(a, "--count")) { NEEDV(); count = atoll(v); }
        else if (!strcmp(a, "--duration")) { NEEDV(); duration = atof(v); }
        else if (!strcmp(a, "--inflight")) { NEEDV(); inflight = atol(v); }
        else if (!strcmp(a, "--timeout-ms")) { NEEDV(); timeout_ms = atof(v); }
        else if (!strcmp(a, "--warmup")) { NEEDV(); warmup = atol(v); }
        else if (!strcmp(a, "--marker")) { NEEDV(); marker = atol(v); }
        else if (!strcmp(a, "--dump")) { NEEDV(); dump = v; }
        else { fprintf(stderr, "pingpong: unknown option %s\n", a); return 2; }
    }
    if (!dst_s) usage("--dst is required");
    if (size < HDR || size > MAX_SIZE) usage("--size must be 20-65000");
    if (!(rate > 0 && rate <= 1e7)) usage("--rate must be in (0, 1e7]");
    if (!(duration > 0 && duration <= 3600)) usage("--duration must be in (0, 3600]");
    if (inflight < 1 || inflight > RING / 2) usage("--inflight must be 1-32768");
    if (!(timeout_ms > 0 && timeout_ms <= 10000)) usage("--timeout-ms must be in (0, 10000]");
    if (warmup < 0 || warmup > 100000) usage("--warmup must be 0-100000");
    if (marker < 1 || marker > 255) usage("--marker must be 1-255");
    if (count < 0 || count > 100000000) usage("--count must be 0-100000000");
    if (count == 0)
        count = (long long)(rate * duration) + 1;

    /* Wake-ups on time: the default 50 us timer slack would be most of a round trip. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

    struct sockaddr_storage da;
    socklen_t dlen = parse_hostport(dst_s, &da);
    int fd = socket(da.ss_family, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    int buf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    if (connect(fd, (struct sockaddr *)&da, dlen) < 0) die("connect");

    uint32_t *rtt = malloc((size_t)count * sizeof *rtt);
    unsigned char *out = calloc(1, (size_t)size), *in = malloc(MAX_SIZE + 1);
    if (!rtt || !out || !in) die("malloc");
    uint64_t timeout_ns = (uint64_t)(timeout_ms * 1e6);
    unsigned long long sent = 0, got = 0, lost = 0, late = 0, bad = 0, send_errors = 0;
    unsigned long long warm_got = 0, window_waits = 0;
    size_t nrtt = 0;

    /* Warm-up: marker 0, one at a time, not recorded (creates the relay's association). */
    out[0] = 0;
    for (long w = 0; w < warmup; w++) {
        if (send(fd, out, (size_t)size, 0) < 0) { send_errors++; continue; }
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, (int)timeout_ms) > 0) {
            while (recv(fd, in, MAX_SIZE + 1, 0) > 0)
                warm_got++;
        }
    }

    uint64_t interval = (uint64_t)(1e9 / rate);
    uint64_t t0 = now_ns(), stop_at = t0 + (uint64_t)(duration * 1e9);
    uint64_t next = t0, oldest = 0, outstanding = 0, end = 0, last_send = t0;
    out[0] = (unsigned char)marker;
    for (;;) {
        uint64_t t = now_ns();
        int sending = (long long)sent < count && t < stop_at;
        if (!sending && !end)
            end = t + timeout_ns;           /* the last echoes get one timeout */
        if (!sending && (outstanding == 0 || t >= end))
            break;
        /* Expire the oldest outstanding datagrams. */
        while (oldest < sent) {
            struct slot *s = &ring[oldest % RING];
            if (s->seq == oldest + 1) {
                if (t - s->sent_ns < timeout_ns)
                    break;
                s->seq = 0;
                lost++;
                outstanding--;
            }
            oldest++;
        }
        /* Send what is due, while the window has room; more than 16 intervals behind
         * (a full window, a long stall) the schedule restarts instead of bursting. */
        if (sending && next + 16 * interval < t)
            next = t;
        while (sending && next <= t && (long long)sent < count) {
            if (outstanding >= (uint64_t)inflight) {
                window_waits++;
                break;
            }
            uint64_t seq = sent, ts = now_ns();
            memcpy(out + 4, &seq, 8);
            memcpy(out + 12, &ts, 8);
            last_send = ts;
            if (send(fd, out, (size_t)size, 0) < 0) {
                send_errors++;
            } else {
                ring[seq % RING].seq = seq + 1;
                ring[seq % RING].sent_ns = ts;
                outstanding++;
            }
            sent++;
            next += interval;
        }
        /* Read every echo there is. */
        for (;;) {
            ssize_t n = recv(fd, in, MAX_SIZE + 1, 0);
            if (n < 0)
                break;
            uint64_t tr = now_ns(), seq;
            if (n < HDR || in[0] != (unsigned char)marker) {
                if (n >= 1 && in[0] == 0)
                    warm_got++;
                else
                    bad++;
                continue;
            }
            memcpy(&seq, in + 4, 8);
            struct slot *s = &ring[seq % RING];
            if (seq >= sent || s->seq != seq + 1) {
                late++;                     /* expired, repeated or never sent */
                continue;
            }
            s->seq = 0;
            outstanding--;
            got++;
            uint64_t d = tr - s->sent_ns;
            if (nrtt < (size_t)count)
                rtt[nrtt++] = d > 0xffffffffull ? 0xffffffffu : (uint32_t)d;
        }
        /* Sleep until the next send, the next expiry or an echo (done: no sleep). */
        t = now_ns();
        if (((long long)sent >= count || t >= stop_at) && outstanding == 0)
            break;
        uint64_t wake = end ? end : stop_at;
        if (sending && outstanding < (uint64_t)inflight && next < wake)
            wake = next;
        if (oldest < sent && ring[oldest % RING].seq == oldest + 1) {
            uint64_t exp = ring[oldest % RING].sent_ns + timeout_ns;
            if (exp < wake)
                wake = exp;
        }
        if (wake > t) {
            uint64_t w = wake - t;
            struct timespec ts = {(time_t)(w / 1000000000ull), (long)(w % 1000000000ull)};
            struct pollfd p = {fd, POLLIN, 0};
            if (ppoll(&p, 1, &ts, NULL) < 0 && errno != EINTR)
                die("ppoll");
        }
    }
    double elapsed = (double)(now_ns() - t0) / 1e9;
    /* The send rate over the sending window (first to last send), not the final wait. */
    double window = (double)(last_send - t0) / 1e9;
    double send_rate = sent > 1 && window > 0 ? (double)(sent - 1) / window : 0.0;
    lost += outstanding;

    if (dump) {
        FILE *f = fopen(dump, "wb");
        if (!f || fwrite(rtt, sizeof *rtt, nrtt, f) != nrtt || fclose(f) != 0)
            die("--dump");
    }
    qsort(rtt, nrtt, sizeof *rtt, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < nrtt; i++)
        sum += rtt[i];
    printf("{\"sent\": %llu, \"received\": %llu, \"lost\": %llu, \"late\": %llu, "
           "\"bad\": %llu, \"send_errors\": %llu, \"warmup_echoes\": %llu, "
           "\"window_waits\": %llu, \"elapsed\": %.6f, \"rate\": %.1f, \"size\": %ld, "
           "\"samples\": %zu, \"min_us\": %.3f, \"mean_us\": %.3f, \"p50_us\": %.3f, "
           "\"p90_us\": %.3f, \"p99_us\": %.3f, \"p999_us\": %.3f, \"max_us\": %.3f}\n",
           sent, got, lost, late, bad, send_errors, warm_got, window_waits, elapsed,
           send_rate, size, nrtt,
           nrtt ? rtt[0] / 1000.0 : -1, nrtt ? sum / nrtt / 1000.0 : -1,
           pct_us(rtt, nrtt, 0.50), pct_us(rtt, nrtt, 0.90), pct_us(rtt, nrtt, 0.99),
           pct_us(rtt, nrtt, 0.999), nrtt ? rtt[nrtt - 1] / 1000.0 : -1);
    return 0;
}
