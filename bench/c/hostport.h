/* hostport.h: HOST:PORT / [V6]:PORT parsing shared by the benchmark's C tools.
 * The including file defines usage(const char *msg) (prints and exits) first. */
#ifndef BENCH_HOSTPORT_H
#define BENCH_HOSTPORT_H
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static void usage(const char *msg);

/* Fills *out from "HOST:PORT" or "[V6]:PORT" and returns its length; bad text: usage(). */
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

#endif
