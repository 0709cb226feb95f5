/* The C limit for RawSender: prebuilt spoofed IPv4/IPv6 + UDP packets sent from an
 * IPPROTO_RAW socket with sendmmsg, `batch` packets per call.
 *
 * usage: raw_sendmmsg SRC SPORT DST DPORT SIZE COUNT [BATCH [TTL]]
 *
 * The packets (headers + payload, checksums by its own RFC 1071 code) are built once,
 * one per batch slot with a sequence number in the payload; the timed loop only calls
 * sendmmsg. Prints one line: "sent N seconds S rate R cpu C": datagrams sent, the
 * loop's wall time, datagrams per second, and the process's user+sys CPU seconds in it.
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_RECVERR
#define IP_RECVERR 11
#endif
#ifndef IPV6_RECVERR
#define IPV6_RECVERR 25
#endif

#define MAX_BATCH 1024
#define MAX_RETRIES 50

static uint32_t sum16(const uint8_t *p, size_t n, uint32_t s)
{
    while (n > 1) {
        s += (uint32_t)p[0] << 8 | p[1];
        p += 2;
        n -= 2;
    }
    if (n)
        s += (uint32_t)p[0] << 8;
    return s;
}

static uint16_t fold(uint32_t s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }

/* Headers + payload into out; returns the packet length. */
static size_t build(uint8_t *out, int v6, const uint8_t *src, uint16_t sport,
                    const uint8_t *dst, uint16_t dport, size_t plen, uint8_t ttl,
                    uint32_t seq)
{
    size_t ipl = v6 ? 40 : 20, alen = v6 ? 16 : 4;
    uint8_t *udp = out + ipl, *payload = udp + 8;
    uint32_t udp_len = 8 + plen, s;
    uint16_t c;
    for (size_t i = 0; i < plen; i++)
        payload[i] = (uint8_t)(i + seq);
    if (plen >= 4) {
        uint32_t nseq = htonl(seq);
        memcpy(payload, &nseq, 4);
    }
    memset(out, 0, ipl + 8);
    if (v6) {
        out[0] = 0x60;
        put16(out + 4, udp_len);
        out[6] = 17;
        out[7] = ttl;
        memcpy(out + 8, src, 16);
        memcpy(out + 24, dst, 16);
    } else {
        out[0] = 0x45;
        put16(out + 2, 20 + udp_len);
        put16(out + 6, 0x4000);
        out[8] = ttl;
        out[9] = 17;
        memcpy(out + 12, src, 4);
        memcpy(out + 16, dst, 4);
        put16(out + 10, fold(sum16(out, 20, 0)));
    }
    put16(udp, sport);
    put16(udp + 2, dport);
    put16(udp + 4, udp_len);
    s = sum16(src, alen, 0);
    s = sum16(dst, alen, s);
    s += 17 + udp_len;
    s = sum16(udp, 8 + plen, s);
    c = fold(s);
    put16(udp + 6, c ? c : 0xffff);
    return ipl + 8 + plen;
}

int main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: %s SRC SPORT DST DPORT SIZE COUNT [BATCH [TTL]]\n", argv[0]);
        return 2;
    }
    uint8_t src[16], dst[16];
    int v6 = strchr(argv[1], ':') != NULL;
    int fam = v6 ? AF_INET6 : AF_INET;
    if (inet_pton(fam, argv[1], src) != 1 || inet_pton(fam, argv[3], dst) != 1) {
        fprintf(stderr, "bad address (both of one family)\n");
        return 2;
    }
    int sport = atoi(argv[2]), dport = atoi(argv[4]);
    long size = atol(argv[5]), count = atol(argv[6]);
    int batch = argc > 7 ? atoi(argv[7]) : 64, ttl = argc > 8 ? atoi(argv[8]) : 64;
    if (size < 0 || size > (v6 ? 65527 : 65507) || count < 0 || batch < 1 ||
        batch > MAX_BATCH || ttl < 1 || ttl > 255) {
        fprintf(stderr, "argument out of range\n");
        return 2;
    }

    int fd = socket(fam, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_RAW);
    if (fd < 0) {
        perror("socket(SOCK_RAW) (needs CAP_NET_RAW)");
        return 1;
    }
    int one = 1;
    if (v6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_RECVERR, &one, sizeof one);
    else if (setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &one, sizeof one) < 0 ||
             setsockopt(fd, IPPROTO_IP, IP_RECVERR, &one, sizeof one) < 0) {
        perror("setsockopt");
        return 1;
    }

    size_t slot = (v6 ? 48 : 28) + (size_t)size;
    uint8_t *pkts = calloc(batch, slot);
    struct mmsghdr *msgs = calloc(batch, sizeof *msgs);
    struct iovec *iov = calloc(batch, sizeof *iov);
    struct sockaddr_storage *names = calloc(batch, sizeof *names);
    if (!pkts || !msgs || !iov || !names) {
        perror("calloc");
        return 1;
    }
    for (int i = 0; i < batch; i++) {
        iov[i].iov_base = pkts + (size_t)i * slot;
        iov[i].iov_len = build(iov[i].iov_base, v6, src, sport, dst, dport, size, ttl, i);
        if (v6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&names[i];
            a->sin6_family = AF_INET6;
            memcpy(&a->sin6_addr, dst, 16);
            msgs[i].msg_hdr.msg_namelen = sizeof *a;
        } else {
            struct sockaddr_in *a = (struct sockaddr_in *)&names[i];
            a->sin_family = AF_INET;
            memcpy(&a->sin_addr, dst, 4);
            msgs[i].msg_hdr.msg_namelen = sizeof *a;
        }
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    struct timespec t0, t1;
    struct rusage u0, u1;
    long sent = 0;
    int off = 0, retries = 0;
    getrusage(RUSAGE_SELF, &u0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (sent < count) {
        int want = batch - off;
        if (want > count - sent)
            want = (int)(count - sent);
        int r = sendmmsg(fd, msgs + off, want, 0);
        if (r > 0) {
            sent += r;
            off = (off + r) % batch;
            retries = 0;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0 || ((errno == EAGAIN || errno == ENOBUFS) && retries < MAX_RETRIES)) {
            struct pollfd p = { .fd = fd, .events = POLLOUT };
            poll(&p, 1, retries ? 1 : 0);
            retries++;
            continue;
        }
        perror("sendmmsg");
        break;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    getrusage(RUSAGE_SELF, &u1);
    double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    double cpu = (u1.ru_utime.tv_sec - u0.ru_utime.tv_sec) + (u1.ru_stime.tv_sec - u0.ru_stime.tv_sec)
        + ((u1.ru_utime.tv_usec - u0.ru_utime.tv_usec) + (u1.ru_stime.tv_usec - u0.ru_stime.tv_usec)) / 1e6;
    printf("sent %ld seconds %.6f rate %.1f cpu %.6f\n", sent, secs, secs > 0 ? sent / secs : 0.0, cpu);
    return sent == count ? 0 : 1;
}
