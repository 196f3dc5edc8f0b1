/* The open-loop load generator: requests due at fixed or Poisson times, latency from each one's due time.
 *
 * bench/openloop.py builds this with the system's C compiler and runs it; see its docstring for the options.
 * In C because the generator shares two cores with the servers it measures: the Python one it replaces cost
 * about 100 us of CPU per new connection, and uvloop's millisecond timers sent requests up to a millisecond
 * late, which the latency (counted from the due time, as it must be) then charged to the server. Here a
 * timerfd fires at each due time to the nanosecond, and a request costs the syscalls it needs.
 *
 * Prints one line `BENCH_JSON {...}` (latencies in microseconds) and exits 0; bad arguments exit 2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLASSES 16
#define HEAD_BYTES 8192   /* a response's status line and headers must fit */
#define TIMER_TAG ((void *)1)

enum { DEAD = -2, GONE_IDLE = -1, IDLE, CONNECTING, WRITING, READING }; /* a connection's state */
enum { E_CONNECT, E_READ, E_WRITE, E_STATUS, E_TIMEOUT, E_KINDS };
static const char *ERROR_NAMES[E_KINDS] = {"connect", "read", "write", "status", "timeout"};

typedef struct Conn {
    int fd, state, req;          /* req: the request it carries, -1 when idle */
    size_t wrote, head_len;
    long long body_left;         /* -1 until the headers are parsed; then body bytes still to come */
    int keep, status, no_length;
    int64_t issued;              /* when its current request was written (closed loop: the due time) */
    struct Conn *next;           /* the free list of Conn structs */
    char head[HEAD_BYTES];
} Conn;

static struct {
    const char *host, *path, *mix;
    int port, closed, conns, pool, max_conns, fifo, close_mode, poisson;
    double rate, duration, timeout, short_ms;
    uint64_t seed;
} opt = {"127.0.0.1", "/", "", 0, 0, 0, 16, 256, 0, 0, 0, 1000, 10, 5, -1, 12345};

static int nclasses;
static double class_share[MAX_CLASSES], class_ms[MAX_CLASSES];
static double logn_median, logn_sigma;   /* lognormal mix when logn_median > 0 */

static int64_t *due, *lat;       /* per request: due time (ns from t0), latency (ns; -1 not done, -2 error) */
static float *req_ms;            /* per request: the handler's ms (mix), or -1 for the fixed path */
static int total, alloc_n, issued_n, done_n, outstanding, opened, open_now, scan_from;
static struct Conn **req_conn; /* per request: the connection carrying it, while it does */
static int errors[E_KINDS];
static int64_t t0, max_late, *late;
static int ep;
static Conn *free_conns, *limbo; /* limbo: dropped during this batch of events, reused after it */
/* Idle keep-alive connections: a ring, newest at the top (LIFO reuse, as nginx's upstream keepalive cache),
 * or oldest first with --fifo. */
static Conn **idle;
static int idle_head, idle_n, idle_cap;
static int *waiting, wait_head, wait_n; /* requests due while no connection could be had, in order */
static struct sockaddr_in addr;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint64_t rng_state;
static double uniform(void) { /* splitmix64 -> (0, 1) */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return ((z >> 11) + 0.5) / 9007199254740992.0;
}

static void usage(const char *why) {
    fprintf(stderr, "openloop: %s\n", why);
    exit(2);
}

static void parse_mix(const char *spec) {
    if (strncmp(spec, "lognormal:", 10) == 0) {
        if (sscanf(spec + 10, "%lf:%lf", &logn_median, &logn_sigma) != 2 || logn_median <= 0 || logn_sigma < 0)
            usage("--mix lognormal:MEDIAN_MS:SIGMA");
        if (opt.short_ms < 0) /* the 5% above the 95th percentile are the long ones */
            opt.short_ms = logn_median * exp(1.6448536 * logn_sigma);
        return;
    }
    char *copy = strdup(spec), *save = NULL;
    double sum = 0;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        if (nclasses == MAX_CLASSES || sscanf(item, "%lf:%lf", &class_share[nclasses], &class_ms[nclasses]) != 2
            || class_share[nclasses] <= 0 || class_ms[nclasses] < 0)
            usage("--mix SHARE:MS[,SHARE:MS...] (e.g. 0.95:0.5,0.05:10) or lognormal:MEDIAN_MS:SIGMA");
        sum += class_share[nclasses++];
    }
    free(copy);
    if (!nclasses)
        usage("--mix is empty");
    double lo = class_ms[0];
    for (int i = 0; i < nclasses; i++) {
        class_share[i] /= sum;
        if (class_ms[i] < lo)
            lo = class_ms[i];
    }
    if (opt.short_ms < 0)
        opt.short_ms = lo; /* the shortest class is "short" */
}

static double draw_ms(void) {
    if (logn_median > 0) {
        double u1 = uniform(), u2 = uniform();
        double normal = sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
        double ms = logn_median * exp(logn_sigma * normal);
        return ms > 1000 ? 1000 : ms;
    }
    double u = uniform(), acc = 0;
    for (int i = 0; i < nclasses; i++) {
        acc += class_share[i];
        if (u <= acc)
            return class_ms[i];
    }
    return class_ms[nclasses - 1];
}

static int arm(Conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    return epoll_ctl(ep, op, c->fd, &ev);
}

static void finish(Conn *c, int error);

static void record(int req, int64_t t, int error) {
    req_conn[req] = NULL;
    if (lat[req] != -1)
        return; /* it timed out already and was counted then */
    if (error >= 0) {
        errors[error]++;
        lat[req] = -2;
    } else {
        lat[req] = t - (opt.closed ? due[req] : t0 + due[req]);
    }
    done_n++;
    outstanding--;
}

static void drop(Conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    open_now--;
    c->state = DEAD;
    c->next = limbo; /* a later event of this batch may still name it: not reused before the next batch */
    limbo = c;
}

static int format_request(Conn *c, char *out, size_t room) {
    const char *conn = opt.close_mode ? "Connection: close\r\n" : "";
    if (req_ms[c->req] >= 0)
        return snprintf(out, room, "GET %s?ms=%.3f HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n", opt.path, req_ms[c->req],
                        opt.host, opt.port, conn);
    return snprintf(out, room, "GET %s HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n", opt.path, opt.host, opt.port, conn);
}

static void write_request(Conn *c) {
    char req[512];
    int len = format_request(c, req, sizeof req);
    while (c->wrote < (size_t)len) {
        ssize_t n = send(c->fd, req + c->wrote, len - c->wrote, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                c->state = WRITING;
                arm(c, EPOLLOUT, EPOLL_CTL_MOD);
                return;
            }
            finish(c, E_WRITE);
            return;
        }
        c->wrote += n;
    }
    c->state = READING;
    c->head_len = 0;
    c->body_left = -1;
    c->no_length = 0;
    arm(c, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD);
}

static void start_on(Conn *c, int req) {
    c->req = req;
    req_conn[req] = c;
    c->wrote = 0;
    c->issued = now_ns();
    int64_t late_by = c->issued - (opt.closed ? due[req] : t0 + due[req]);
    late[req] = late_by;
    if (late_by > max_late)
        max_late = late_by;
    if (c->state == CONNECTING)
        return; /* written once the connect completes */
    write_request(c);
}

static Conn *open_conn(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    Conn *c = free_conns;
    if (c)
        free_conns = c->next;
    else if (!(c = malloc(sizeof *c))) {
        close(fd);
        return NULL;
    }
    c->fd = fd;
    c->req = -1;
    c->keep = 1;
    opened++;
    open_now++;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0) {
        c->state = IDLE;
        arm(c, 0, EPOLL_CTL_ADD);
    } else if (errno == EINPROGRESS) {
        c->state = CONNECTING;
        arm(c, EPOLLOUT, EPOLL_CTL_ADD);
    } else {
        close(fd);
        open_now--;
        c->next = free_conns;
        free_conns = c;
        return NULL;
    }
    return c;
}

static Conn *take_idle(void) {
    while (idle_n) {
        Conn *c;
        if (opt.fifo) {
            c = idle[idle_head];
            idle_head = (idle_head + 1) % idle_cap;
        } else {
            c = idle[(idle_head + idle_n - 1) % idle_cap];
        }
        idle_n--;
        if (c->state == IDLE)
            return c;
        drop(c); /* closed by the server while idle */
    }
    return NULL;
}

static void put_idle(Conn *c) {
    if (idle_n == idle_cap) { /* the pool is full: the connection used longest ago goes, as in nginx */
        Conn *old = idle[idle_head];
        idle_head = (idle_head + 1) % idle_cap;
        idle_n--;
        drop(old);
    }
    idle[(idle_head + idle_n) % idle_cap] = c;
    idle_n++;
    c->state = IDLE;
    c->req = -1;
    arm(c, EPOLLRDHUP, EPOLL_CTL_MOD); /* to notice the server closing it */
}

/* Give request req a connection: an idle one, else a new one, else it waits for one to come free. */
static void issue(int req) {
    issued_n++;
    outstanding++;
    Conn *c = opt.close_mode ? NULL : take_idle();
    if (!c && open_now < opt.max_conns) {
        c = open_conn();
        if (!c) {
            late[req] = now_ns() - (opt.closed ? due[req] : t0 + due[req]);
            record(req, 0, E_CONNECT);
            return;
        }
    }
    if (!c) {
        waiting[(wait_head + wait_n++) % alloc_n] = req;
        return;
    }
    start_on(c, req);
}

static int next_waiting(void) {
    while (wait_n) {
        int req = waiting[wait_head];
        wait_head = (wait_head + 1) % alloc_n;
        wait_n--;
        if (lat[req] == -1)
            return req;
    }
    return -1; /* the ones that waited have all timed out */
}

static void next_closed_request(void);

/* The request on c is over (error < 0: answered); the connection goes back to the pool or is closed. */
static void finish(Conn *c, int error) {
    int64_t t = now_ns();
    if (c->req >= 0)
        record(c->req, t, error);
    int reuse = error < 0 && !opt.close_mode && c->keep;
    c->req = -1;
    if (reuse) {
        int req = next_waiting();
        if (req >= 0) {
            c->state = IDLE;
            start_on(c, req);
        } else {
            put_idle(c);
        }
    } else {
        drop(c);
        int req = next_waiting();
        if (req >= 0) {
            Conn *fresh = open_conn();
            if (fresh)
                start_on(fresh, req);
            else
                record(req, t, E_CONNECT);
        }
    }
    if (opt.closed)
        next_closed_request();
}

/* Parse what arrived: the status line and headers, then count the body down. */
static void on_readable(Conn *c) {
    char buf[65536];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return;
            finish(c, E_READ);
            return;
        }
        if (n == 0) {
            if (c->state == IDLE) { /* the server closed an idle keep-alive connection */
                c->state = GONE_IDLE;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                return; /* dropped when take_idle reaches it */
            }
            if (c->no_length && c->body_left >= 0) { /* the body ends with the connection */
                c->keep = 0;
                finish(c, c->status >= 200 && c->status < 300 ? -1 : E_STATUS);
            } else {
                finish(c, E_READ);
            }
            return;
        }
        if (c->state != READING)
            continue; /* bytes on an idle connection: nothing was asked; ignore them */
        ssize_t body_n = n;
        if (c->body_left < 0) {
            size_t room = HEAD_BYTES - 1 - c->head_len;
            size_t take = (size_t)n < room ? (size_t)n : room;
            memcpy(c->head + c->head_len, buf, take);
            size_t before = c->head_len;
            c->head_len += take;
            c->head[c->head_len] = 0;
            char *end = strstr(c->head, "\r\n\r\n");
            if (!end) {
                if (c->head_len >= HEAD_BYTES - 1) {
                    finish(c, E_READ);
                    return;
                }
                continue;
            }
            size_t head_size = (size_t)(end - c->head) + 4;
            c->status = 0;
            sscanf(c->head, "HTTP/1.%*d %d", &c->status);
            long long length = -1;
            c->keep = 1;
            for (char *line = strstr(c->head, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n")) {
                char *h = line + 2;
                if (strncasecmp(h, "content-length:", 15) == 0)
                    length = atoll(h + 15);
                else if (strncasecmp(h, "connection:", 11) == 0) {
                    char *v = h + 11;
                    while (*v == ' ')
                        v++;
                    if (strncasecmp(v, "close", 5) == 0)
                        c->keep = 0;
                }
            }
            c->no_length = length < 0;
            c->body_left = length < 0 ? 0 : length;
            body_n = n - (ssize_t)(head_size - before);
        }
        if (!c->no_length) {
            c->body_left -= body_n;
            if (c->body_left <= 0) {
                finish(c, c->status >= 200 && c->status < 300 ? -1 : E_STATUS);
                return;
            }
        }
    }
}

static void on_event(Conn *c) {
    if (c->state < IDLE)
        return; /* dropped earlier in this batch of events */
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            finish(c, E_CONNECT);
            return;
        }
        c->state = IDLE;
        if (c->req >= 0)
            write_request(c);
        else
            arm(c, EPOLLRDHUP, EPOLL_CTL_MOD);
        return;
    }
    if (c->state == WRITING) {
        write_request(c);
        return;
    }
    if (c->state == READING || c->state == IDLE)
        on_readable(c);
}

static int closed_next; /* closed loop: the next request index to hand out */
static int64_t closed_end;

static void next_closed_request(void) {
    while (closed_next < total && outstanding < opt.closed && now_ns() < closed_end) {
        due[closed_next] = now_ns();
        issue(closed_next++);
    }
}

/* Requests past the timeout count as errors; the connections carrying them are closed. */
static void expire(int64_t t) {
    while (scan_from < issued_n && lat[scan_from] != -1)
        scan_from++; /* requests end roughly in order: the scan starts at the oldest still open */
    for (int i = scan_from; i < issued_n; i++) {
        int64_t started = opt.closed ? due[i] : t0 + due[i];
        if (lat[i] != -1 || t - started <= (int64_t)(opt.timeout * 1e9))
            continue;
        lat[i] = -3;
        errors[E_TIMEOUT]++;
        done_n++;
        outstanding--;
        Conn *c = req_conn[i];
        req_conn[i] = NULL;
        if (c) {
            c->req = -1;
            drop(c);
        }
    }
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void percentiles(FILE *out, const char *name, int64_t *v, int n) {
    qsort(v, n, sizeof *v, cmp_i64);
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += v[i];
#define AT(p) (n ? v[(int)((p) / 100.0 * n) < n ? (int)((p) / 100.0 * n) : n - 1] / 1000 : 0)
    fprintf(out, "\"%s\": {\"count\": %d, \"p50\": %lld, \"p90\": %lld, \"p99\": %lld, \"p999\": %lld, "
            "\"max\": %lld, \"mean\": %.1f}", name, n, (long long)AT(50), (long long)AT(90), (long long)AT(99),
            (long long)AT(99.9), (long long)(n ? v[n - 1] / 1000 : 0), n ? sum / n / 1000 : 0.0);
#undef AT
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(flag) (strcmp(a, flag) == 0 && v && ++i)
        if (ARG("--host")) opt.host = v;
        else if (ARG("--port")) opt.port = atoi(v);
        else if (ARG("--path")) opt.path = v;
        else if (ARG("--mix")) opt.mix = v;
        else if (ARG("--short-ms")) opt.short_ms = atof(v);
        else if (ARG("--rate")) opt.rate = atof(v);
        else if (ARG("--duration")) opt.duration = atof(v);
        else if (ARG("--closed")) opt.closed = atoi(v);
        else if (ARG("--conns")) opt.conns = atoi(v);
        else if (ARG("--pool")) opt.pool = atoi(v);
        else if (ARG("--max-conns")) opt.max_conns = atoi(v);
        else if (ARG("--timeout")) opt.timeout = atof(v);
        else if (ARG("--seed")) opt.seed = strtoull(v, NULL, 10);
        else if (strcmp(a, "--close") == 0) opt.close_mode = 1;
        else if (strcmp(a, "--fifo") == 0) opt.fifo = 1;
        else if (strcmp(a, "--poisson") == 0) opt.poisson = 1;
        else usage(a);
#undef ARG
    }
    if (opt.port <= 0 || opt.duration <= 0 || (opt.closed <= 0 && opt.rate <= 0) || opt.max_conns < 1 || opt.pool < 1)
        usage("needs --port and a positive --duration, and --rate or --closed");
    if (*opt.mix)
        parse_mix(opt.mix);
    rng_state = opt.seed;
    addr.sin_family = AF_INET;
    addr.sin_port = htons(opt.port);
    if (inet_pton(AF_INET, opt.host, &addr.sin_addr) != 1)
        usage("--host must be an IPv4 address");
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    /* The schedule, fixed by the seed: every system gets the same requests at the same offsets. */
    /* closed loop: room for 50,000 requests a second (the hello page on 2 cores does about 35,000) */
    total = opt.closed ? (int)(opt.duration * 50000) + opt.closed : (int)(opt.rate * opt.duration);
    if (total < 1)
        total = 1;
    alloc_n = total;
    due = calloc(total, sizeof *due);
    lat = malloc(total * sizeof *lat);
    late = calloc(total, sizeof *late);
    req_ms = malloc(total * sizeof *req_ms);
    waiting = malloc(total * sizeof *waiting);
    req_conn = calloc(total, sizeof *req_conn);
    idle_cap = opt.pool;
    idle = malloc(idle_cap * sizeof *idle);
    if (!due || !lat || !late || !req_ms || !waiting || !idle || !req_conn)
        usage("out of memory");
    double at = 0;
    for (int i = 0; i < total; i++) {
        lat[i] = -1;
        req_ms[i] = *opt.mix ? (float)draw_ms() : -1.0f;
        if (!opt.closed) {
            due[i] = (int64_t)(at * 1e9);
            at += opt.poisson ? -log(uniform()) / opt.rate : 1.0 / opt.rate;
        }
    }

    ep = epoll_create1(EPOLL_CLOEXEC);
    int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = TIMER_TAG};
    epoll_ctl(ep, EPOLL_CTL_ADD, timer, &tev);
    for (int i = 0; i < opt.conns && !opt.close_mode; i++) { /* connections opened before the run */
        Conn *c = open_conn();
        if (!c)
            usage("cannot connect");
        while (c->state == CONNECTING) {
            struct epoll_event ev;
            if (epoll_wait(ep, &ev, 1, 5000) <= 0)
                usage("connect timed out");
            on_event(ev.data.ptr);
        }
        if (c->state != IDLE)
            usage("cannot connect");
        put_idle(c);
    }

    t0 = now_ns() + 10000000; /* 10 ms from now */
    int64_t end = t0 + (int64_t)(opt.duration * 1e9);
    int next = 0;
    if (opt.closed) {
        closed_end = end;
        struct timespec pause = {0, 10000000};
        nanosleep(&pause, NULL);
        next_closed_request();
    }
    int64_t last_expiry = t0;
    struct epoll_event events[256];
    for (;;) {
        int64_t t = now_ns();
        if (!opt.closed) {
            while (next < total && t0 + due[next] <= t)
                issue(next++);
            if (next < total) {
                struct itimerspec its = {{0, 0}, {(t0 + due[next]) / 1000000000, (t0 + due[next]) % 1000000000}};
                timerfd_settime(timer, TFD_TIMER_ABSTIME, &its, NULL);
            }
        } else {
            next_closed_request();
            if (closed_next >= total || t >= end)
                total = closed_next; /* no more will be issued */
        }
        int all_issued = opt.closed ? t >= end || closed_next >= total : next >= total;
        if (all_issued && outstanding <= 0)
            break;
        if (t - last_expiry > 100000000) {
            expire(t);
            last_expiry = t;
            if (all_issued && t > end + (int64_t)(opt.timeout * 1e9) + 1000000000LL)
                break; /* whatever is left will not come */
        }
        int wait_ms = 100;
        if (opt.closed && t < end)
            wait_ms = (int)((end - t) / 1000000) + 1 < 100 ? (int)((end - t) / 1000000) + 1 : 100;
        int n = epoll_wait(ep, events, 256, wait_ms);
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == TIMER_TAG) {
                uint64_t ticks;
                if (read(timer, &ticks, sizeof ticks) < 0) { /* EAGAIN: already read */ }
                continue;
            }
            on_event(events[i].data.ptr);
        }
        while (limbo) {
            Conn *c = limbo;
            limbo = c->next;
            c->next = free_conns;
            free_conns = c;
        }
    }
    int64_t finished = now_ns();
    int64_t span = (int64_t)(opt.duration * 1e9);

    int64_t *all = malloc((total + 1) * sizeof *all), *shortv = malloc((total + 1) * sizeof *shortv);
    int64_t *lates = malloc((total + 1) * sizeof *lates);
    int n_all = 0, n_short = 0, n_late = 0;
    for (int i = 0; i < total; i++) {
        if (i < issued_n)
            lates[n_late++] = late[i];
        if (lat[i] < 0)
            continue;
        all[n_all++] = lat[i];
        if (req_ms[i] >= 0 && req_ms[i] <= opt.short_ms)
            shortv[n_short++] = lat[i];
    }
    FILE *out = stdout;
    fprintf(out, "BENCH_JSON {\"requests\": %d, \"sent\": %d, \"duration_us\": %lld, \"wall_us\": %lld, "
            "\"rate\": %g, \"closed\": %d, \"connections\": %d, \"max_late_us\": %lld, \"short_ms\": %g, ",
            n_all, issued_n, (long long)(span / 1000), (long long)((finished - t0) / 1000), opt.rate, opt.closed,
            opened, (long long)(max_late / 1000), opt.short_ms < 0 ? 0 : opt.short_ms);
    fprintf(out, "\"errors\": {");
    for (int e = 0; e < E_KINDS; e++)
        fprintf(out, "%s\"%s\": %d", e ? ", " : "", ERROR_NAMES[e], errors[e]);
    fprintf(out, "}, ");
    percentiles(out, "latency_us", all, n_all);
    fprintf(out, ", ");
    percentiles(out, "short_latency_us", shortv, n_short);
    fprintf(out, ", ");
    percentiles(out, "late_us", lates, n_late);
    fprintf(out, "}\n");
    return 0;
}
