/* softrdma conformance tests: the harness (test runner, assertions, verbs helpers).
 *
 * Every test runs in its own forked process (its own process group, an alarm(), and a
 * wall-clock limit enforced by the runner), so a crash or a hang fails that test only
 * and the library's per-process state (the NIC thread, fault counters) is fresh for
 * each. The runner itself never opens a device, so every test process is forked before
 * any device is opened, as the library requires. Peers of cross-process tests are
 * forked by the test process; they die with it (PR_SET_PDEATHSIG), are killed by an
 * atexit handler when a check fails, and the runner (a child subreaper) kills and reaps
 * whatever is left in the test's process group. */
#ifndef SOFTRDMA_TEST_HARNESS_H
#define SOFTRDMA_TEST_HARNESS_H

#define _GNU_SOURCE
#include <infiniband/verbs.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/capability.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ failures */
struct shared {
	int claimed;      /* the first failure (test or peer) wins */
	int skipped;      /* the message says why the test could not run here */
	char msg[2048];
};
static struct shared *g_sh;
static int g_is_peer;
static pid_t g_peers[16];
static int g_npeers;

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void nap_us(long us)
{
	struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static void kill_peers(void)
{
	for (int i = 0; i < g_npeers; i++)
		if (g_peers[i] > 0) {
			kill(g_peers[i], SIGKILL);
			waitpid(g_peers[i], NULL, 0);
			g_peers[i] = 0;
		}
	g_npeers = 0;
}

static void __attribute__((noreturn, format(printf, 3, 4)))
fail_at(const char *file, int line, const char *fmt, ...)
{
	if (g_sh && __sync_bool_compare_and_swap(&g_sh->claimed, 0, 1)) {
		const char *base = strrchr(file, '/');
		int n = snprintf(g_sh->msg, sizeof g_sh->msg, "%s%s:%d: ", g_is_peer ? "[peer] " : "",
				 base ? base + 1 : file, line);
		if (n < 0 || (size_t)n >= sizeof g_sh->msg)
			n = 0;
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(g_sh->msg + n, sizeof g_sh->msg - (size_t)n, fmt, ap);
		va_end(ap);
	}
	exit(1); /* atexit: kill_peers */
}

#define FAIL(...) fail_at(__FILE__, __LINE__, __VA_ARGS__)

/* The test cannot run in this environment (not a failure; reported as "skip"). */
static void __attribute__((noreturn, format(printf, 1, 2))) skip_test(const char *fmt, ...)
{
	if (g_sh && __sync_bool_compare_and_swap(&g_sh->claimed, 0, 1)) {
		g_sh->skipped = 1;
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(g_sh->msg, sizeof g_sh->msg, fmt, ap);
		va_end(ap);
	}
	exit(77);
}

static int has_cap_ipc_lock(void)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2];
	memset(d, 0, sizeof d);
	if (syscall(SYS_capget, &h, d))
		return 0;
	return (d[CAP_IPC_LOCK / 32].effective >> (CAP_IPC_LOCK % 32)) & 1;
}

/* Registrations are charged to RLIMIT_MEMLOCK (as the kernel does): a test that pins
 * `bytes` in one process needs that much unless it has CAP_IPC_LOCK. */
static void need_memlock(size_t bytes)
{
	struct rlimit rl;
	if (has_cap_ipc_lock() || getrlimit(RLIMIT_MEMLOCK, &rl) || rl.rlim_cur == RLIM_INFINITY ||
	    rl.rlim_cur >= bytes)
		return;
	skip_test("pins about %zu MiB: needs that much RLIMIT_MEMLOCK (ulimit -l is %llu KiB) "
		  "or CAP_IPC_LOCK",
		  (bytes + (1u << 20) - 1) >> 20, (unsigned long long)rl.rlim_cur >> 10);
}
#define CHECK(c)                                                                          \
	do {                                                                              \
		if (!(c))                                                                 \
			FAIL("%s", #c);                                                   \
	} while (0)
#define CHECKM(c, ...)                                                                    \
	do {                                                                              \
		if (!(c))                                                                 \
			FAIL(__VA_ARGS__);                                                \
	} while (0)
#define EQ(a, b)                                                                          \
	do {                                                                              \
		long long _a = (long long)(a), _b = (long long)(b);                       \
		if (_a != _b)                                                             \
			FAIL("%s == %s: got %lld (%#llx), expected %lld (%#llx)", #a, #b, _a, \
			     (unsigned long long)_a, _b, (unsigned long long)_b);         \
	} while (0)
/* An errno-style result (0 or a positive errno). */
#define EQ_ERR(a, e)                                                                      \
	do {                                                                              \
		int _a = (a), _e = (e);                                                   \
		if (_a != _e)                                                             \
			FAIL("%s: got %d (%s), expected %d (%s)", #a, _a, strerror(_a), _e,   \
			     strerror(_e));                                               \
	} while (0)
/* A constructor that must fail with errno `e`. */
#define NULL_ERRNO(expr, e)                                                               \
	do {                                                                              \
		errno = 0;                                                                \
		void *_p = (void *)(expr);                                                \
		int _e = errno;                                                           \
		if (_p)                                                                   \
			FAIL("%s succeeded, expected errno %s", #expr, strerror(e));      \
		if (_e != (e))                                                            \
			FAIL("%s: errno %d (%s), expected %d (%s)", #expr, _e, strerror(_e), \
			     (e), strerror(e));                                           \
	} while (0)

static const char *st_str(enum ibv_wc_status s) { return ibv_wc_status_str(s); }

#define EQ_ST(wc, st)                                                                     \
	do {                                                                              \
		if ((wc).status != (st))                                                  \
			FAIL("wr_id %llu: status %s (%d), expected %s",                   \
			     (unsigned long long)(wc).wr_id, st_str((wc).status),         \
			     (int)(wc).status, st_str(st));                               \
	} while (0)

/* ------------------------------------------------------------------ data patterns */
static void fill(void *p, size_t len, unsigned seed)
{
	uint8_t *b = p;
	for (size_t i = 0; i < len; i++)
		b[i] = (uint8_t)(i * 131u + seed * 7u + (i >> 8) * 3u + seed);
}

/* Index of the first byte that differs from fill(seed), or -1. */
static long mismatch(const void *p, size_t len, unsigned seed)
{
	const uint8_t *b = p;
	for (size_t i = 0; i < len; i++)
		if (b[i] != (uint8_t)(i * 131u + seed * 7u + (i >> 8) * 3u + seed))
			return (long)i;
	return -1;
}

#define CHECK_FILL(p, len, seed)                                                          \
	do {                                                                              \
		long _m = mismatch((p), (len), (seed));                                   \
		if (_m >= 0)                                                              \
			FAIL("data mismatch at byte %ld of %zu (%s, seed %u)", _m,        \
			     (size_t)(len), #p, (unsigned)(seed));                        \
	} while (0)

static void *xmap(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECKM(p != MAP_FAILED, "mmap %zu: %s", len, strerror(errno));
	return p;
}

/* ------------------------------------------------------------------ devices */
static struct ibv_context *open_dev(const char *name)
{
	int n = 0;
	struct ibv_device **l = ibv_get_device_list(&n);
	CHECKM(l, "ibv_get_device_list: %s", strerror(errno));
	struct ibv_context *ctx = NULL;
	for (int i = 0; i < n; i++)
		if (!strcmp(ibv_get_device_name(l[i]), name))
			ctx = ibv_open_device(l[i]);
	ibv_free_device_list(l);
	CHECKM(ctx, "ibv_open_device(%s): %s", name, strerror(errno));
	return ctx;
}

static int ctx_is_eth(struct ibv_context *ctx)
{
	struct ibv_port_attr pa;
	CHECK(ibv_query_port(ctx, 1, &pa) == 0);
	return pa.link_layer == IBV_LINK_LAYER_ETHERNET;
}

/* ------------------------------------------------------------------ queue pairs */
struct qpo { /* connection options of one side */
	int access;
	uint8_t timeout, retry_cnt, rnr_retry, min_rnr_timer;
	uint8_t max_rd_atomic, max_dest_rd_atomic;
	enum ibv_mtu mtu;
	int gid_index;
};

static struct qpo dflt(void)
{
	struct qpo o = {
		.access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
			  IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC,
		.timeout = 14,	    /* 67 ms */
		.retry_cnt = 7,
		.rnr_retry = 7,	    /* infinite */
		.min_rnr_timer = 1, /* 10 us */
		.max_rd_atomic = 16,
		.max_dest_rd_atomic = 16,
		.mtu = IBV_MTU_1024,
		.gid_index = 1, /* on RoCE: the link-local GID as RoCE v2 */
	};
	return o;
}

struct ep { /* what a peer needs to connect to a QP */
	uint32_t qpn, psn;
	uint16_t lid;
	uint8_t is_eth, gid_index;
	union ibv_gid gid;
};

static struct ep mk_ep(struct ibv_context *ctx, struct ibv_qp *qp, uint32_t psn, int gid_index)
{
	struct ep e;
	memset(&e, 0, sizeof e);
	struct ibv_port_attr pa;
	CHECK(ibv_query_port(ctx, 1, &pa) == 0);
	e.qpn = qp->qp_num;
	e.psn = psn & 0xffffff;
	e.lid = pa.lid;
	e.is_eth = pa.link_layer == IBV_LINK_LAYER_ETHERNET;
	e.gid_index = (uint8_t)(e.is_eth ? gid_index : 0);
	CHECK(ibv_query_gid(ctx, 1, e.gid_index, &e.gid) == 0);
	return e;
}

struct qpcfg {
	uint32_t send_wr, recv_wr, send_sge, recv_sge, inline_data;
	int sig_all;
};

static struct qpcfg qcfg(void)
{
	struct qpcfg c = {256, 256, 4, 4, 0, 0};
	return c;
}

static struct ibv_qp *mk_qp(struct ibv_pd *pd, struct ibv_cq *scq, struct ibv_cq *rcq,
			    const struct qpcfg *c)
{
	struct ibv_qp_init_attr a;
	memset(&a, 0, sizeof a);
	a.send_cq = scq;
	a.recv_cq = rcq;
	a.qp_type = IBV_QPT_RC;
	a.sq_sig_all = c->sig_all;
	a.cap.max_send_wr = c->send_wr;
	a.cap.max_recv_wr = c->recv_wr;
	a.cap.max_send_sge = c->send_sge;
	a.cap.max_recv_sge = c->recv_sge;
	a.cap.max_inline_data = c->inline_data;
	struct ibv_qp *qp = ibv_create_qp(pd, &a);
	CHECKM(qp, "ibv_create_qp: %s", strerror(errno));
	return qp;
}

static int to_init(struct ibv_qp *qp, int access)
{
	struct ibv_qp_attr a;
	memset(&a, 0, sizeof a);
	a.qp_state = IBV_QPS_INIT;
	a.port_num = 1;
	a.pkey_index = 0;
	a.qp_access_flags = access;
	return ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
					     IBV_QP_ACCESS_FLAGS);
}

static void fill_av(struct ibv_ah_attr *av, const struct ep *r, int gid_index)
{
	memset(av, 0, sizeof *av);
	av->dlid = r->lid;
	av->port_num = 1;
	av->is_global = r->is_eth;
	if (r->is_eth) {
		av->grh.dgid = r->gid;
		av->grh.sgid_index = (uint8_t)gid_index;
		av->grh.hop_limit = 64;
	}
}

static int to_rtr(struct ibv_qp *qp, const struct ep *r, const struct qpo *o)
{
	struct ibv_qp_attr a;
	memset(&a, 0, sizeof a);
	a.qp_state = IBV_QPS_RTR;
	a.path_mtu = o->mtu;
	a.dest_qp_num = r->qpn;
	a.rq_psn = r->psn;
	a.max_dest_rd_atomic = o->max_dest_rd_atomic;
	a.min_rnr_timer = o->min_rnr_timer;
	fill_av(&a.ah_attr, r, o->gid_index);
	return ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU |
					     IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
					     IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
}

static int to_rts(struct ibv_qp *qp, uint32_t psn, const struct qpo *o)
{
	struct ibv_qp_attr a;
	memset(&a, 0, sizeof a);
	a.qp_state = IBV_QPS_RTS;
	a.timeout = o->timeout;
	a.retry_cnt = o->retry_cnt;
	a.rnr_retry = o->rnr_retry;
	a.sq_psn = psn;
	a.max_rd_atomic = o->max_rd_atomic;
	return ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
					     IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
					     IBV_QP_MAX_QP_RD_ATOMIC);
}

static int to_state(struct ibv_qp *qp, enum ibv_qp_state s)
{
	struct ibv_qp_attr a;
	memset(&a, 0, sizeof a);
	a.qp_state = s;
	return ibv_modify_qp(qp, &a, IBV_QP_STATE);
}

/* RESET -> INIT -> RTR -> RTS towards `r`. */
static void connect_qp(struct ibv_qp *qp, const struct ep *r, uint32_t my_psn, const struct qpo *o)
{
	EQ_ERR(to_init(qp, o->access), 0);
	EQ_ERR(to_rtr(qp, r, o), 0);
	EQ_ERR(to_rts(qp, my_psn, o), 0);
	EQ(qp->state, IBV_QPS_RTS);
}

static enum ibv_qp_state query_state(struct ibv_qp *qp)
{
	struct ibv_qp_attr a;
	struct ibv_qp_init_attr i;
	EQ_ERR(ibv_query_qp(qp, &a, IBV_QP_STATE, &i), 0);
	return a.qp_state;
}

/* ------------------------------------------------------------------ a connected pair */
struct side {
	struct ibv_qp *qp;
	struct ibv_cq *scq, *rcq;
	uint8_t *buf;
	struct ibv_mr *mr;
	struct ep ep;
	struct qpo o;
};

struct pcfg {
	size_t len;		       /* registered buffer bytes per side */
	struct qpcfg q;
	int cqe;
	struct ibv_comp_channel *ch_b; /* channel of B's receive CQ */
	int connect;		       /* 0: leave both QPs in RESET */
};

static struct pcfg pc(size_t len)
{
	struct pcfg c = {len, qcfg(), 1024, NULL, 1};
	return c;
}

struct pair {
	struct ibv_context *ctx;
	struct ibv_pd *pd;
	int eth;
	struct side a, b;
};

static void side_init(struct pair *p, struct side *s, const struct pcfg *c, const struct qpo *o,
		      struct ibv_comp_channel *rch, uint32_t psn)
{
	s->o = *o;
	s->scq = ibv_create_cq(p->ctx, c->cqe, NULL, NULL, 0);
	CHECKM(s->scq, "ibv_create_cq: %s", strerror(errno));
	s->rcq = ibv_create_cq(p->ctx, c->cqe, s, rch, 0);
	CHECKM(s->rcq, "ibv_create_cq: %s", strerror(errno));
	s->qp = mk_qp(p->pd, s->scq, s->rcq, &c->q);
	s->buf = xmap(c->len);
	s->mr = ibv_reg_mr(p->pd, s->buf, c->len,
			   IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
				   IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC);
	if (!s->mr && errno == ENOMEM)
		need_memlock(2 * c->len + (1u << 20)); /* both sides: skips if the limit is why */
	CHECKM(s->mr, "ibv_reg_mr: %s", strerror(errno));
	s->ep = mk_ep(p->ctx, s->qp, psn, o->gid_index);
}

/* Two QPs of one device in this process, A and B, each with a send and a receive CQ and
 * a registered buffer. `ctx` NULL opens `dev`. */
static void pair_init2(struct pair *p, struct ibv_context *ctx, const char *dev,
		       const struct pcfg *c, const struct qpo *oa, const struct qpo *ob)
{
	memset(p, 0, sizeof *p);
	p->ctx = ctx ? ctx : open_dev(dev);
	p->eth = ctx_is_eth(p->ctx);
	p->pd = ibv_alloc_pd(p->ctx);
	CHECK(p->pd);
	side_init(p, &p->a, c, oa, NULL, 0x1000 + (uint32_t)(now_ms() * 7) % 0x10000);
	side_init(p, &p->b, c, ob, c->ch_b, 0xabc000 + (uint32_t)(now_ms() * 13) % 0x1000);
	if (c->connect) {
		connect_qp(p->a.qp, &p->b.ep, p->a.ep.psn, oa);
		connect_qp(p->b.qp, &p->a.ep, p->b.ep.psn, ob);
	}
}

static void pair_init(struct pair *p, const char *dev, size_t len)
{
	struct pcfg c = pc(len);
	struct qpo o = dflt();
	pair_init2(p, NULL, dev, &c, &o, &o);
}

/* ------------------------------------------------------------------ posting */
static int post_wr(struct ibv_qp *qp, enum ibv_wr_opcode op, uint64_t id, void *addr,
		   uint32_t len, uint32_t lkey, uint64_t raddr, uint32_t rkey, unsigned flags,
		   uint32_t imm)
{
	struct ibv_sge sge = {(uintptr_t)addr, len, lkey};
	struct ibv_send_wr wr, *bad = NULL;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = id;
	wr.opcode = op;
	wr.send_flags = flags;
	wr.sg_list = &sge;
	wr.num_sge = addr ? 1 : 0;
	wr.imm_data = imm;
	wr.wr.rdma.remote_addr = raddr;
	wr.wr.rdma.rkey = rkey;
	int rc = ibv_post_send(qp, &wr, &bad);
	if (rc && bad != &wr)
		FAIL("ibv_post_send failed (%s) without pointing bad_wr at the request",
		     strerror(rc));
	return rc;
}

#define POST(...)                                                                         \
	do {                                                                              \
		int _rc = post_wr(__VA_ARGS__);                                           \
		if (_rc)                                                                  \
			FAIL("ibv_post_send: %s", strerror(_rc));                         \
	} while (0)

static int post_atomic(struct ibv_qp *qp, enum ibv_wr_opcode op, uint64_t id, void *local,
		       uint32_t lkey, uint64_t raddr, uint32_t rkey, uint64_t cmp_add, uint64_t swap)
{
	struct ibv_sge sge = {(uintptr_t)local, 8, lkey};
	struct ibv_send_wr wr, *bad = NULL;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = id;
	wr.opcode = op;
	wr.send_flags = IBV_SEND_SIGNALED;
	wr.sg_list = &sge;
	wr.num_sge = 1;
	wr.wr.atomic.remote_addr = raddr;
	wr.wr.atomic.rkey = rkey;
	wr.wr.atomic.compare_add = cmp_add;
	wr.wr.atomic.swap = swap;
	return ibv_post_send(qp, &wr, &bad);
}

static int post_recv_ret(struct ibv_qp *qp, uint64_t id, void *addr, uint32_t len, uint32_t lkey)
{
	struct ibv_sge sge = {(uintptr_t)addr, len, lkey};
	struct ibv_recv_wr wr, *bad = NULL;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = id;
	wr.sg_list = &sge;
	wr.num_sge = addr ? 1 : 0;
	int rc = ibv_post_recv(qp, &wr, &bad);
	if (rc && bad != &wr)
		FAIL("ibv_post_recv failed (%s) without pointing bad_wr at the request",
		     strerror(rc));
	return rc;
}

#define RECV(...)                                                                         \
	do {                                                                              \
		int _rc = post_recv_ret(__VA_ARGS__);                                     \
		if (_rc)                                                                  \
			FAIL("ibv_post_recv: %s", strerror(_rc));                         \
	} while (0)

/* ------------------------------------------------------------------ completions */
/* Poll until `n` completions arrived or `ms` passed; the number that arrived. */
static int poll_for(struct ibv_cq *cq, struct ibv_wc *wc, int n, int ms)
{
	int got = 0;
	double end = now_ms() + ms;
	while (got < n) {
		int r = ibv_poll_cq(cq, n - got, wc + got);
		CHECKM(r >= 0, "ibv_poll_cq returned %d", r);
		got += r;
		if (got >= n)
			break;
		if (now_ms() > end)
			break;
		if (!r)
			nap_us(20);
	}
	return got;
}

static struct ibv_wc wait_wc_at(const char *file, int line, struct ibv_cq *cq, int ms,
			       const char *what)
{
	struct ibv_wc wc;
	memset(&wc, 0, sizeof wc);
	if (poll_for(cq, &wc, 1, ms) != 1)
		fail_at(file, line, "no completion for %s within %d ms", what, ms);
	return wc;
}
#define wait_wc(cq, ms, what) wait_wc_at(__FILE__, __LINE__, cq, ms, what)

/* The next completion must be `id` with status `st`. */
#define EXPECT_WC(cq, id, st, ms)                                                         \
	({                                                                                \
		struct ibv_wc _w = wait_wc((cq), (ms), "wr_id " #id);                     \
		if (_w.wr_id != (uint64_t)(id))                                           \
			FAIL("completion for wr_id %llu (%s), expected wr_id %llu",       \
			     (unsigned long long)_w.wr_id, st_str(_w.status),             \
			     (unsigned long long)(id));                                   \
		EQ_ST(_w, st);                                                            \
		_w;                                                                       \
	})

static void expect_none_at(const char *file, int line, struct ibv_cq *cq, int ms,
			   const char *what)
{
	struct ibv_wc wc;
	if (poll_for(cq, &wc, 1, ms) != 0)
		fail_at(file, line, "unexpected completion (%s): wr_id %llu status %s", what,
			(unsigned long long)wc.wr_id, st_str(wc.status));
}
#define expect_none(cq, ms, what) expect_none_at(__FILE__, __LINE__, cq, ms, what)

/* Wait for an async event of type `want` (others are acknowledged and skipped). 1 when
 * it came (the caller acknowledges it), 0 on timeout. */
static int get_async(struct ibv_context *ctx, enum ibv_event_type want,
		     struct ibv_async_event *ev, int ms)
{
	double end = now_ms() + ms;
	for (;;) {
		int left = (int)(end - now_ms());
		if (left < 0)
			left = 0;
		struct pollfd pfd = {ctx->async_fd, POLLIN, 0};
		int r = poll(&pfd, 1, left);
		if (r <= 0)
			return 0;
		CHECK(ibv_get_async_event(ctx, ev) == 0);
		if (ev->event_type == want)
			return 1;
		ibv_ack_async_event(ev);
	}
}

static int fd_readable(int fd, int ms)
{
	struct pollfd pfd = {fd, POLLIN, 0};
	return poll(&pfd, 1, ms) > 0 && (pfd.revents & POLLIN);
}

/* ------------------------------------------------------------------ peers */
struct peer {
	pid_t pid;
	int fd;
};

static struct peer spawn_peer(void (*fn)(int fd, const void *arg), const void *arg)
{
	int sv[2];
	CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
	pid_t parent = getpid();
	fflush(stdout);
	pid_t pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		close(sv[0]);
		g_is_peer = 1;
		g_npeers = 0;
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(1);
		fn(sv[1], arg);
		exit(0);
	}
	close(sv[1]);
	int slot = 0;
	while (slot < g_npeers && g_peers[slot] > 0)
		slot++;
	CHECK(slot < (int)(sizeof g_peers / sizeof g_peers[0]));
	g_peers[slot] = pid;
	if (slot == g_npeers)
		g_npeers++;
	struct peer p = {pid, sv[0]};
	return p;
}

static void msg_send(int fd, const void *b, size_t n)
{
	ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
	CHECKM(w == (ssize_t)n, "send to %s: %s", g_is_peer ? "parent" : "peer",
	       w < 0 ? strerror(errno) : "short");
}

static void msg_recv(int fd, void *b, size_t n, int ms)
{
	struct pollfd pfd = {fd, POLLIN, 0};
	int r = poll(&pfd, 1, ms);
	CHECKM(r > 0, "nothing from the %s within %d ms", g_is_peer ? "parent" : "peer", ms);
	ssize_t got = recv(fd, b, n, 0);
	CHECKM(got == (ssize_t)n, "message from the %s: %s", g_is_peer ? "parent" : "peer",
	       got == 0 ? "connection closed (did it fail?)" : got < 0 ? strerror(errno) : "short");
}

static void msg_send_u32(int fd, uint32_t v) { msg_send(fd, &v, sizeof v); }
static uint32_t msg_recv_u32(int fd, int ms)
{
	uint32_t v;
	msg_recv(fd, &v, sizeof v, ms);
	return v;
}

/* Wait for the peer to exit; its exit status (killed on timeout: a failure). */
static int peer_wait(struct peer *p, int ms)
{
	double end = now_ms() + ms;
	int st = 0;
	for (;;) {
		pid_t r = waitpid(p->pid, &st, WNOHANG);
		if (r == p->pid)
			break;
		if (now_ms() > end) {
			kill(p->pid, SIGKILL);
			waitpid(p->pid, &st, 0);
			FAIL("peer %d did not exit within %d ms", (int)p->pid, ms);
		}
		nap_us(500);
	}
	for (int i = 0; i < g_npeers; i++)
		if (g_peers[i] == p->pid)
			g_peers[i] = 0;
	close(p->fd);
	p->fd = -1;
	if (WIFSIGNALED(st))
		FAIL("peer killed by signal %d", WTERMSIG(st));
	return WEXITSTATUS(st);
}

/* Exchange of what a peer needs: the QP endpoint and one memory region. */
struct xinfo {
	struct ep ep;
	uint64_t addr, len;
	uint32_t rkey, pad;
};

/* ------------------------------------------------------------------ the runner */
struct test {
	const char *name;
	void (*fn)(const void *arg);
	const void *arg;
	int timeout_s;
	const char *group; /* NULL: the default run; else the env group that runs it */
};

static const char *g_group_prefix = "";

/* Run one test in its own process; 1 if it passed, 0 if it failed, 2 if skipped. */
static int run_test(const struct test *t)
{
	memset(g_sh, 0, sizeof *g_sh);
	fflush(stdout);
	double t0 = now_ms();
	pid_t pid = fork();
	if (pid < 0) {
		printf("FAIL %s%s: fork: %s\n", g_group_prefix, t->name, strerror(errno));
		return 0;
	}
	if (pid == 0) {
		setpgid(0, 0);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		signal(SIGPIPE, SIG_IGN);
		atexit(kill_peers);
		alarm((unsigned)t->timeout_s);
		t->fn(t->arg);
		exit(0);
	}
	setpgid(pid, pid);
	int st = 0, timed_out = 0;
	double limit = now_ms() + (t->timeout_s + 2) * 1000.0;
	for (;;) {
		pid_t r = waitpid(pid, &st, WNOHANG);
		if (r == pid)
			break;
		if (now_ms() > limit) {
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			waitpid(pid, &st, 0);
			timed_out = 1;
			break;
		}
		nap_us(1000);
	}
	/* Whatever the test left behind in its process group goes now; orphans were
	 * reparented to us (a child subreaper) and are reaped here. */
	kill(-pid, SIGKILL);
	for (int i = 0; i < 200; i++) {
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		if (kill(-pid, 0) && errno == ESRCH)
			break;
		nap_us(1000);
	}
	double ms = now_ms() - t0;
	int ok = !timed_out && WIFEXITED(st) && WEXITSTATUS(st) == 0 && !g_sh->claimed;
	if (!timed_out && WIFEXITED(st) && WEXITSTATUS(st) == 77 && g_sh->skipped) {
		printf("skip %s%s: %s\n", g_group_prefix, t->name, g_sh->msg);
		fflush(stdout);
		return 2;
	}
	if (ok) {
		printf("ok   %s%s (%.0f ms)\n", g_group_prefix, t->name, ms);
	} else {
		char why[2200];
		if (g_sh->claimed)
			snprintf(why, sizeof why, "%s", g_sh->msg);
		else if (timed_out)
			snprintf(why, sizeof why, "hung: killed after %d s", t->timeout_s + 2);
		else if (WIFSIGNALED(st))
			snprintf(why, sizeof why, "killed by signal %d (%s)%s", WTERMSIG(st),
				 strsignal(WTERMSIG(st)),
				 WTERMSIG(st) == SIGALRM ? ": the test's alarm, it hung" : "");
		else
			snprintf(why, sizeof why, "exit status %d", WEXITSTATUS(st));
		printf("FAIL %s%s: %s (%.0f ms)\n", g_group_prefix, t->name, why, ms);
	}
	fflush(stdout);
	return ok;
}

/* ------------------------------------------------------------------ capabilities */
static void drop_ipc_lock(void)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2];
	memset(d, 0, sizeof d);
	CHECK(syscall(SYS_capget, &h, d) == 0);
	uint32_t bit = 1u << (CAP_IPC_LOCK % 32);
	d[CAP_IPC_LOCK / 32].effective &= ~bit;
	d[CAP_IPC_LOCK / 32].permitted &= ~bit;
	d[CAP_IPC_LOCK / 32].inheritable &= ~bit;
	CHECKM(syscall(SYS_capset, &h, d) == 0, "capset: %s", strerror(errno));
}

#endif
