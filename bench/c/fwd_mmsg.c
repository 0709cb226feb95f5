/* fwd_mmsg: the minimal UDP forwarder the benchmark uses as "the C limit".
 *
 *   fwd_mmsg --listen HOST:PORT (--to HOST:PORT | --tproxy [--full-cone]) [--batch 64]
 *            [--mark N] [--rcvbuf BYTES]
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

#define MAX_BATCH 256
#define SLOT_BYTES 65536
#define CTRL_BYTES 64
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
static int tproxy, full_cone, mark = -1, rcvbuf = 4 << 20, epfd, lfd;
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

static socklen_t parse_hostport(const char *s, struct sockaddr_storage *out)
{
    char host[128];
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s || (size_t)(colon - s) >= sizeof host)
        usage("address must be HOST:PORT or [V6]:PORT");
    long port = strtol(colon + 1, NULL, 10);
    if (port < 0 || port > 65535)
        usage("port must be 0-65535");
    size_t len = (size_t)(colon - s);
    if (s[0] == '[') {
        if (len < 2 || s[len - 1] != ']')
            usage("IPv6 address must be in brackets");
        memcpy(host, s + 1, len - 2);
        host[len - 2] = 0;
    } else {
        memcpy(host, s, len);
        host[len] = 0;
    }
    memset(out, 0, sizeof *out);
    struct sockaddr_in *a4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        return sizeof *a4;
    }
    if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        return sizeof *a6;
    }
    usage("bad IP address");
    return 0;
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
                    if (tproxy) {
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
                            sm[i].msg_hdr.msg_name = &sdst[i];
                            sm[i].msg_hdr.msg_namelen = olen;
                        }
                    } else {
                        owner[i] = lookup(&lname[i], lm[i].msg_hdr.msg_namelen, &target,
                                          target_len);
                    }
                    siov[i].iov_len = lm[i].msg_len;
                    if (!owner[i])
                        n_drop_up++;
                }
                for (int i = 0; i < n;) {
                    struct assoc *o = owner[i];
                    int j = i + 1;
                    if (!o) {
                        i = j;
                        continue;
                    }
                    while (j < n && owner[j] == o)
                        j++;
                    int k = sendmmsg(o->up, sm + i, (unsigned)(j - i), MSG_DONTWAIT);
                    if (k < 0) k = 0;
                    n_up += (unsigned)k;
                    n_drop_up += (unsigned)(j - i - k);
                    i = j;
                }
            } else {
                /* Upstream -> client. */
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
