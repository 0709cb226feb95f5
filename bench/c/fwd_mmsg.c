/* fwd_mmsg: the minimal UDP forwarder the benchmark uses as "the C limit".
 *
 *   fwd_mmsg --listen HOST:PORT (--to HOST:PORT | --tproxy [--full-cone]) [--batch 64]
 *            [--mark N] [--rcvbuf BYTES] [--gso]
 *
 * Does the same work as a relay, with nothing else: recvmmsg a batch from the listen
 * socket; look each client up in a hash table (a new client gets its own upstream UDP
 * socket, connected to the target); send each run of datagrams of one client with one
 * sendmmsg on its upstream socket. Replies are read with recvmmsg from the upstream
 * sockets (epoll) and sent back with sendmmsg from the listen socket.
 * --tproxy: the listen socket has IP_TRANSPARENT and IP_RECVORIGDSTADDR (it receives
 * TPROXY'd traffic); the association key is (client, original destination), the upstream
 * socket is connected to the original destination, and replies go out of an
 * IP_TRANSPARENT socket bound to the original destination (so the client sees the remote
 * as the source). --full-cone keys associations by client only: one unconnected upstream
 * socket per client, every datagram sent with its own destination (the work a full-cone
 * relay such as `relay redir` has to do; replies still leave bound to the first destination,
 * which is the only remote in the benchmark).
 * --gso: UDP_GRO on every receiving socket (a GSO buffer arrives whole, with its segment
 * size in a control message) and every run of one association's datagrams of one segment
 * size (only the last may be shorter, at most 64 segments and 65000 bytes) leaves as ONE
 * message with a UDP_SEGMENT control message and an iovec per received buffer, both ways:
 * what the best user-space relay can do (the "c-limit-gso" anchor of the benchmark).
 * No idle expiry and no per-datagram logging. SIGTERM/SIGINT: print counters as JSON on
 * stderr and exit.
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
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hostport.h"

#ifndef IP_TRANSPARENT
#define IP_TRANSPARENT 19
#endif
#ifndef IP_RECVORIGDSTADDR
#define IP_RECVORIGDSTADDR 20
#endif
#ifndef IP_ORIGDSTADDR
#define IP_ORIGDSTADDR IP_RECVORIGDSTADDR
#endif
#ifndef IPV6_TRANSPARENT
#define IPV6_TRANSPARENT 75
#endif
#ifndef IPV6_RECVORIGDSTADDR
#define IPV6_RECVORIGDSTADDR 74
#endif
#ifndef IPV6_ORIGDSTADDR
#define IPV6_ORIGDSTADDR IPV6_RECVORIGDSTADDR
#endif
#ifndef SO_MARK
#define SO_MARK 36
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

#define MAX_BATCH 256
#define SLOT_BYTES 65536
#define CTRL_BYTES 128
#define GSO_MAX_SEGS 64
#define GSO_MAX_BYTES 65000
#define NBUCKETS (1u << 16)

struct assoc {
    struct sockaddr_storage client;
    socklen_t clen;
    struct sockaddr_storage odst;   /* where the upstream socket is connected */
    socklen_t olen;
    int up;                         /* upstream socket */
    int reply;                      /* --tproxy: transparent socket bound to odst, or -1 */
    struct assoc *next;
};

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static struct assoc *table[NBUCKETS];
static int tproxy, full_cone, gso, mark = -1, rcvbuf = 4 << 20, epfd, lfd;
static struct sockaddr_storage target;
static socklen_t target_len;
static unsigned long long n_up, n_down, n_assoc, n_drop_up, n_drop_down, n_refused;

static void usage(const char *msg)
{
    fprintf(stderr, "fwd_mmsg: %s\n", msg);
    exit(2);
}

static void die(const char *what)
{
    fprintf(stderr, "fwd_mmsg: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int addr_eq(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return x->sin6_port == y->sin6_port &&
           !memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr);
}

static uint32_t addr_hash(const struct sockaddr_storage *a, uint32_t h)
{
    const unsigned char *p;
    size_t n;
    uint16_t port;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a;
        p = (const void *)&x->sin_addr;
        n = 4;
        port = x->sin_port;
    } else {
        const struct sockaddr_in6 *x = (const void *)a;
        p = (const void *)&x->sin6_addr;
        n = 16;
        port = x->sin6_port;
    }
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    h = (h ^ (port & 0xff)) * 16777619u;
    h = (h ^ (port >> 8)) * 16777619u;
    return h;
}

static void set_rcvbuf(int fd, int bytes)
{
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
}

static void enable_gro(int fd);

static struct assoc *lookup(const struct sockaddr_storage *client, socklen_t clen,
                            const struct sockaddr_storage *odst, socklen_t olen)
{
    uint32_t h = addr_hash(client, 2166136261u);
    if (tproxy && !full_cone)
        h = addr_hash(odst, h);
    struct assoc **slot = &table[h & (NBUCKETS - 1)];
    for (struct assoc *a = *slot; a; a = a->next)
        if (addr_eq(&a->client, client) && (!tproxy || full_cone || addr_eq(&a->odst, odst)))
            return a;

    int up = socket(odst->ss_family, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (up < 0) {
        n_refused++;
        return NULL;
    }
    if (mark >= 0)
        setsockopt(up, SOL_SOCKET, SO_MARK, &mark, sizeof mark);
    set_rcvbuf(up, rcvbuf);
    if (gso)
        enable_gro(up);
    /* --full-cone: one unconnected socket per client, each datagram names its destination
     * (what a full-cone relay must do); otherwise one connected socket per destination. */
    if (!full_cone && connect(up, (const struct sockaddr *)odst, olen) < 0) {
        close(up);
        n_refused++;
        return NULL;
    }
    struct assoc *a = calloc(1, sizeof *a);
    if (!a) {
        close(up);
        n_refused++;
        return NULL;
    }
    memcpy(&a->client, client, clen);
    a->clen = clen;
    memcpy(&a->odst, odst, olen);
    a->olen = olen;
    a->up = up;
    a->reply = -1;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = a};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, up, &ev) < 0)
        die("epoll_ctl");
    a->next = *slot;
    *slot = a;
    n_assoc++;
    return a;
}

/* --gso: receive GSO buffers whole (UDP_GRO). */
static void enable_gro(int fd)
{
    int one = 1;
    if (setsockopt(fd, SOL_UDP, UDP_GRO, &one, sizeof one) < 0)
        die("UDP_GRO (Linux 5.0+)");
}

/* Segment size of a received buffer: the UDP_GRO control message, else its length. */
static size_t gro_size(struct msghdr *h, size_t len)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
            int v;
            memcpy(&v, CMSG_DATA(c), sizeof v);
            if (v > 0)
                return (size_t)v;
        }
    }
    return len ? len : 1;
}

/* Sends n received buffers (iov[i], segment size seg[i]) to one destination (name NULL:
 * the connected peer), each run of equal-size segments as one UDP_SEGMENT message.
 * Adds the datagrams sent to *ok and those not sent to *lost. */
static void send_runs(int fd, struct iovec *iov, const size_t *seg, int n,
                      void *name, socklen_t namelen, unsigned long long *ok,
                      unsigned long long *lost)
{
    static struct mmsghdr gm[MAX_BATCH];
    static unsigned char gctrl[MAX_BATCH][CMSG_SPACE(sizeof(uint16_t))];
    static unsigned nsegs[MAX_BATCH];
    int m = 0;
    for (int i = 0; i < n;) {
        size_t s = seg[i], bytes = 0;
        unsigned segs = 0;
        int first = i;
        while (i < n) {
            size_t len = iov[i].iov_len;
            unsigned k = (unsigned)((len + seg[i] - 1) / seg[i]);
            if (len == 0)
                k = 1;
            if (i > first) {
                /* joins when the run so far ends on a full segment and this buffer is
                 * of the run's size (or one shorter datagram: the run's tail) */
                if (bytes % s || !(seg[i] == s || (len < s && k == 1)))
                    break;
                if (bytes + len > GSO_MAX_BYTES || segs + k > GSO_MAX_SEGS)
                    break;
            }
            bytes += len;
            segs += k;
            i++;
        }
        struct msghdr *h = &gm[m].msg_hdr;
        memset(h, 0, sizeof *h);
        h->msg_name = name;
        h->msg_namelen = name ? namelen : 0;
        h->msg_iov = iov + first;
        h->msg_iovlen = (size_t)(i - first);
        if (segs > 1) {
            h->msg_control = gctrl[m];
            h->msg_controllen = sizeof gctrl[m];
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t v = (uint16_t)s;
            memcpy(CMSG_DATA(c), &v, sizeof v);
        }
        nsegs[m++] = segs;
    }
    int k = sendmmsg(fd, gm, (unsigned)m, MSG_DONTWAIT);
    if (k < 0)
        k = 0;
    for (int j = 0; j < m; j++) {
        if (j < k)
            *ok += nsegs[j];
        else
            *lost += nsegs[j];
    }
}

/* --tproxy: the socket replies leave from, bound to the remote the client talked to. */
static int reply_socket(struct assoc *a)
{
    if (a->reply >= 0)
        return a->reply;
    int fam = a->odst.ss_family, one = 1;
    int fd = socket(fam, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fam == AF_INET)
        setsockopt(fd, IPPROTO_IP, IP_TRANSPARENT, &one, sizeof one);
    else
        setsockopt(fd, IPPROTO_IPV6, IPV6_TRANSPARENT, &one, sizeof one);
    if (mark >= 0)
        setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof mark);
    if (bind(fd, (struct sockaddr *)&a->odst, a->olen) < 0) {
        close(fd);
        return -1;
    }
    a->reply = fd;
    return fd;
}

static int get_origdst(struct msghdr *h, struct sockaddr_storage *out, socklen_t *olen)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_ORIGDSTADDR) {
            memcpy(out, CMSG_DATA(c), sizeof(struct sockaddr_in));
            *olen = sizeof(struct sockaddr_in);
            return 0;
        }
        if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_ORIGDSTADDR) {
            memcpy(out, CMSG_DATA(c), sizeof(struct sockaddr_in6));
            *olen = sizeof(struct sockaddr_in6);
            return 0;
        }
    }
    return -1;
}

int main(int argc, char **argv)
{
    const char *listen_s = NULL, *to_s = NULL;
    long batch = 64;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) usage("missing value"); i++; } while (0)
        if (!strcmp(a, "--listen")) { NEEDV(); listen_s = v; }
        else if (!strcmp(a, "--to")) { NEEDV(); to_s = v; }
        else if (!strcmp(a, "--tproxy")) tproxy = 1;
        else if (!strcmp(a, "--full-cone")) full_cone = 1;
        else if (!strcmp(a, "--gso")) gso = 1;
        else if (!strcmp(a, "--batch")) { NEEDV(); batch = atol(v); }
        else if (!strcmp(a, "--mark")) { NEEDV(); mark = atoi(v); }
        else if (!strcmp(a, "--rcvbuf")) { NEEDV(); rcvbuf = atoi(v); }
        else { fprintf(stderr, "fwd_mmsg: unknown option %s\n", a); return 2; }
    }
    if (!listen_s) usage("--listen is required");
    if (!tproxy == !to_s) usage("give exactly one of --to HOST:PORT and --tproxy");
    if (full_cone && !tproxy) usage("--full-cone goes with --tproxy");
    if (batch < 1 || batch > MAX_BATCH) usage("--batch must be 1-256");
    if (to_s) target_len = parse_hostport(to_s, &target);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    struct sockaddr_storage la;
    socklen_t llen = parse_hostport(listen_s, &la);
    lfd = socket(la.ss_family, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    set_rcvbuf(lfd, rcvbuf);
    if (gso)
        enable_gro(lfd);
    if (la.ss_family == AF_INET6)
        setsockopt(lfd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (tproxy) {
        if (la.ss_family == AF_INET) {
            if (setsockopt(lfd, IPPROTO_IP, IP_TRANSPARENT, &one, sizeof one) < 0)
                die("IP_TRANSPARENT (needs CAP_NET_ADMIN)");
            setsockopt(lfd, IPPROTO_IP, IP_RECVORIGDSTADDR, &one, sizeof one);
        } else {
            if (setsockopt(lfd, IPPROTO_IPV6, IPV6_TRANSPARENT, &one, sizeof one) < 0)
                die("IPV6_TRANSPARENT (needs CAP_NET_ADMIN)");
            setsockopt(lfd, IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, &one, sizeof one);
        }
    }
    if (bind(lfd, (struct sockaddr *)&la, llen) < 0) die("bind");

    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev) < 0) die("epoll_ctl");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    /* Client side: receive slots and the send headers that point into them. */
    unsigned char *lpool = malloc((size_t)batch * SLOT_BYTES);
    unsigned char *upool = malloc((size_t)batch * SLOT_BYTES);
    if (!lpool || !upool) die("malloc");
    static struct mmsghdr lm[MAX_BATCH], sm[MAX_BATCH], um[MAX_BATCH], rm[MAX_BATCH];
    static struct sockaddr_storage sdst[MAX_BATCH];
    static socklen_t sdlen[MAX_BATCH];
    static size_t lseg[MAX_BATCH], useg[MAX_BATCH];
    static unsigned char uctrl[MAX_BATCH][CTRL_BYTES];
    static struct iovec liov[MAX_BATCH], siov[MAX_BATCH], uiov[MAX_BATCH], riov[MAX_BATCH];
    static struct sockaddr_storage lname[MAX_BATCH];
    static unsigned char lctrl[MAX_BATCH][CTRL_BYTES];
    static struct assoc *owner[MAX_BATCH];
    for (int i = 0; i < batch; i++) {
        liov[i].iov_base = lpool + (size_t)i * SLOT_BYTES;
        liov[i].iov_len = SLOT_BYTES;
        lm[i].msg_hdr.msg_iov = &liov[i];
        lm[i].msg_hdr.msg_iovlen = 1;
        lm[i].msg_hdr.msg_name = &lname[i];
        siov[i].iov_base = liov[i].iov_base;
        sm[i].msg_hdr.msg_iov = &siov[i];
        sm[i].msg_hdr.msg_iovlen = 1;
        uiov[i].iov_base = upool + (size_t)i * SLOT_BYTES;
        uiov[i].iov_len = SLOT_BYTES;
        um[i].msg_hdr.msg_iov = &uiov[i];
        um[i].msg_hdr.msg_iovlen = 1;
        riov[i].iov_base = uiov[i].iov_base;
        rm[i].msg_hdr.msg_iov = &riov[i];
        rm[i].msg_hdr.msg_iovlen = 1;
    }

    struct epoll_event events[256];
    while (!stop) {
        int ne = epoll_wait(epfd, events, 256, 200);
        for (int e = 0; e < ne; e++) {
            struct assoc *a = events[e].data.ptr;
            if (!a) {
                /* Client -> upstream. */
                for (int i = 0; i < batch; i++) {
                    lm[i].msg_hdr.msg_namelen = sizeof lname[i];
                    if (tproxy || gso) {
                        lm[i].msg_hdr.msg_control = lctrl[i];
                        lm[i].msg_hdr.msg_controllen = CTRL_BYTES;
                    }
                }
                int n = recvmmsg(lfd, lm, (unsigned)batch, MSG_DONTWAIT, NULL);
                if (n <= 0)
                    continue;
                for (int i = 0; i < n; i++) {
                    struct sockaddr_storage od;
                    socklen_t olen;
                    owner[i] = NULL;
                    if (tproxy) {
                        if (get_origdst(&lm[i].msg_hdr, &od, &olen) < 0) {
                            n_drop_up++;
                            continue;
                        }
                        owner[i] = lookup(&lname[i], lm[i].msg_hdr.msg_namelen, &od, olen);
                        if (full_cone) {
                            memcpy(&sdst[i], &od, olen);
                            sdlen[i] = olen;
                            sm[i].msg_hdr.msg_name = &sdst[i];
                            sm[i].msg_hdr.msg_namelen = olen;
                        }
                    } else {
                        owner[i] = lookup(&lname[i], lm[i].msg_hdr.msg_namelen, &target,
                                          target_len);
                    }
                    siov[i].iov_len = lm[i].msg_len;
                    if (gso)
                        lseg[i] = gro_size(&lm[i].msg_hdr, lm[i].msg_len);
                    if (!owner[i])
                        n_drop_up++;   /* a GSO buffer counts once: not the limit's concern */
                }
                for (int i = 0; i < n;) {
                    struct assoc *o = owner[i];
                    int j = i + 1;
                    if (!o) {
                        i = j;
                        continue;
                    }
                    while (j < n && owner[j] == o &&
                           (!gso || !full_cone || addr_eq(&sdst[j], &sdst[i])))
                        j++;
                    if (gso) {
                        send_runs(o->up, siov + i, lseg + i, j - i,
                                  full_cone ? (void *)&sdst[i] : NULL, sdlen[i],
                                  &n_up, &n_drop_up);
                        i = j;
                        continue;
                    }
                    int k = sendmmsg(o->up, sm + i, (unsigned)(j - i), MSG_DONTWAIT);
                    if (k < 0) k = 0;
                    n_up += (unsigned)k;
                    n_drop_up += (unsigned)(j - i - k);
                    i = j;
                }
            } else {
                /* Upstream -> client. */
                if (gso)
                    for (int i = 0; i < batch; i++) {
                        um[i].msg_hdr.msg_control = uctrl[i];
                        um[i].msg_hdr.msg_controllen = CTRL_BYTES;
                    }
                int n = recvmmsg(a->up, um, (unsigned)batch, MSG_DONTWAIT, NULL);
                if (n <= 0)
                    continue;
                int fd = tproxy ? reply_socket(a) : lfd;
                if (fd < 0) {
                    n_drop_down += (unsigned)n;
                    continue;
                }
                for (int i = 0; i < n; i++) {
                    riov[i].iov_len = um[i].msg_len;
                    rm[i].msg_hdr.msg_name = &a->client;
                    rm[i].msg_hdr.msg_namelen = a->clen;
                    if (gso)
                        useg[i] = gro_size(&um[i].msg_hdr, um[i].msg_len);
                }
                if (gso) {
                    send_runs(fd, riov, useg, n, &a->client, a->clen, &n_down, &n_drop_down);
                    continue;
                }
                int k = sendmmsg(fd, rm, (unsigned)n, MSG_DONTWAIT);
                if (k < 0) k = 0;
                n_down += (unsigned)k;
                n_drop_down += (unsigned)(n - k);
            }
        }
    }
    fprintf(stderr, "{\"up\": %llu, \"down\": %llu, \"associations\": %llu, \"drop_up\": %llu, "
            "\"drop_down\": %llu, \"refused\": %llu}\n",
            n_up, n_down, n_assoc, n_drop_up, n_drop_down, n_refused);
    return 0;
}
