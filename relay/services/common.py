"""What the services that face clients share: the open-relay check."""
import ipaddress


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(cfg, what=None):
    """Refuse an open relay: a non-loopback listen address needs credentials (a secret
    for tunnel-server, user/password for socks5) unless insecure is set (the
    configuration parser checks this too)."""
    if what is None:
        what = "user" if cfg.mode == "socks5" else "secret"
    host = cfg.listen[0]
    if is_loopback(host) or cfg.insecure:
        return
    if what == "secret" and not (cfg.secret or cfg.user):
        raise ValueError(f"refusing to listen on {host} without --secret or --username/--password "
                         f"(an open relay); pass --insecure to do it anyway")
    if what == "user" and not cfg.user:
        raise ValueError(f"refusing to listen on {host} without --username/--password (an open "
                         f"relay); pass --insecure to do it anyway")
