/* softrdma: configuration, tracing, randomness, and the library's string and rate
 * helpers (same strings and tables as rdma-core's libibverbs). */
#include "soft.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct soft_config soft_cfg = {
	.trace_fd = 2,
	.lat_min_ns = 0,
	.lat_max_ns = 10000,
	.segment = 64 << 10,
	.fault_rnr = 0,
	.fault_qp_error_after = -1,
	.fault_drop_after = -1,
};

static uint64_t start_ns;
static pthread_mutex_t rng_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t rng_state;

uint64_t soft_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* splitmix64: small, seedable, good enough for latencies and key bytes. */
uint64_t soft_rand(void)
{
	pthread_mutex_lock(&rng_lock);
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
	pthread_mutex_unlock(&rng_lock);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* fork() support (device.c's handlers): the generator's lock is taken while forking;
 * unless SOFTRDMA_SEED fixes the sequence, a child draws its own rather than a copy of
 * its parent's (QPNs are drawn from it: fewer collisions to retry). */
void soft_rand_lock(void) { pthread_mutex_lock(&rng_lock); }
void soft_rand_unlock(void) { pthread_mutex_unlock(&rng_lock); }
void soft_rand_after_fork(void)
{
	pthread_mutex_init(&rng_lock, NULL);
	const char *seed = getenv("SOFTRDMA_SEED");
	if (!seed || !*seed)
		rng_state ^= ((uint64_t)getpid() << 32) ^ soft_now_ns();
}

static void vline(int fd, const char *prefix, const char *fmt, va_list ap)
{
	char buf[1024];
	uint64_t t = soft_now_ns() - start_ns;
	int n = snprintf(buf, sizeof buf, "softrdma[%d.%ld +%llu.%06llus] %s", (int)getpid(),
			 (long)syscall(SYS_gettid), (unsigned long long)(t / 1000000000ull),
			 (unsigned long long)(t / 1000ull % 1000000ull), prefix);
	if (n < 0 || (size_t)n >= sizeof buf)
		n = 0;
	int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
	if (m < 0)
		m = 0;
	size_t len = (size_t)n + (size_t)m;
	if (len > sizeof buf - 2)
		len = sizeof buf - 2;
	buf[len++] = '\n';
	ssize_t w = write(fd, buf, len);
	(void)w;
}

void soft_trace(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vline(soft_cfg.trace_fd, "", fmt, ap);
	va_end(ap);
}

void soft_warn(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vline(2, "warning: ", fmt, ap);
	va_end(ap);
	if (soft_cfg.trace && soft_cfg.trace_fd != 2) {
		va_start(ap, fmt);
		vline(soft_cfg.trace_fd, "warning: ", fmt, ap);
		va_end(ap);
	}
}

static long env_long(const char *name, long dflt, long min, long max)
{
	const char *v = getenv(name);
	if (!v || !*v)
		return dflt;
	char *end;
	errno = 0;
	long x = strtol(v, &end, 0);
	if (errno || *end || x < min || x > max) {
		soft_warn("%s=%s is not a number in [%ld, %ld]; using %ld", name, v, min, max,
			  dflt);
		return dflt;
	}
	return x;
}

/* "A" or "A-B" microseconds. */
static void parse_latency(const char *v)
{
	char *end;
	errno = 0;
	unsigned long a = strtoul(v, &end, 10), b = a;
	if (!errno && *end == '-') {
		b = strtoul(end + 1, &end, 10);
	}
	if (errno || *end || b < a || b > 10000000ul) {
		soft_warn("SOFTRDMA_LATENCY_US=%s: expected MICROS or MIN-MAX; keeping %llu-%llu",
			  v, (unsigned long long)(soft_cfg.lat_min_ns / 1000),
			  (unsigned long long)(soft_cfg.lat_max_ns / 1000));
		return;
	}
	soft_cfg.lat_min_ns = a * 1000ull;
	soft_cfg.lat_max_ns = b * 1000ull;
}

/* "rnr=N,qp_error_after=N,drop_after=N" */
static void parse_faults(const char *v)
{
	char *copy = strdup(v), *save = NULL;
	if (!copy)
		return;
	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');
		long n = -2;
		if (eq) {
			char *end;
			errno = 0;
			n = strtol(eq + 1, &end, 10);
			if (errno || *end || n < 0)
				n = -2;
			*eq = 0;
		}
		if (n == -2) {
			soft_warn("SOFTRDMA_FAULTS: '%s' is not NAME=COUNT; ignored", tok);
			continue;
		}
		if (!strcmp(tok, "rnr"))
			soft_cfg.fault_rnr = n;
		else if (!strcmp(tok, "qp_error_after"))
			soft_cfg.fault_qp_error_after = n;
		else if (!strcmp(tok, "drop_after"))
			soft_cfg.fault_drop_after = n;
		else
			soft_warn("SOFTRDMA_FAULTS: unknown fault '%s' (rnr, qp_error_after, "
				  "drop_after); ignored",
				  tok);
	}
	free(copy);
}

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void do_init(void)
{
	start_ns = soft_now_ns();
	soft_cfg.trace = (int)env_long("SOFTRDMA_TRACE", 0, 0, 2);
	const char *tf = getenv("SOFTRDMA_TRACE_FILE");
	if (tf && *tf) {
		int fd = open(tf, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		if (fd >= 0)
			soft_cfg.trace_fd = fd;
		else
			soft_warn("SOFTRDMA_TRACE_FILE=%s: %s; tracing to stderr", tf,
				  strerror(errno));
	}
	const char *lat = getenv("SOFTRDMA_LATENCY_US");
	if (lat && *lat)
		parse_latency(lat);
	soft_cfg.segment = (size_t)env_long("SOFTRDMA_SEGMENT", 64 << 10, 256, 16 << 20);
	const char *seed = getenv("SOFTRDMA_SEED");
	if (seed && *seed)
		soft_cfg.seed = strtoull(seed, NULL, 0);
	else
		soft_cfg.seed = soft_now_ns() ^ ((uint64_t)getpid() << 32);
	rng_state = soft_cfg.seed;
	const char *faults = getenv("SOFTRDMA_FAULTS");
	if (faults && *faults)
		parse_faults(faults);
	TRACE("%s loaded: latency %llu-%llu us, segment %zu bytes, seed %#llx, faults rnr=%ld "
	      "qp_error_after=%ld drop_after=%ld",
	      SOFT_VERSION, (unsigned long long)(soft_cfg.lat_min_ns / 1000),
	      (unsigned long long)(soft_cfg.lat_max_ns / 1000), soft_cfg.segment,
	      (unsigned long long)soft_cfg.seed, soft_cfg.fault_rnr,
	      soft_cfg.fault_qp_error_after, soft_cfg.fault_drop_after);
}

void soft_init(void) { pthread_once(&init_once, do_init); }

/* ------------------------------------------------------------------ strings */
const char *soft_opcode_str(enum ibv_wr_opcode op)
{
	switch (op) {
	case IBV_WR_RDMA_WRITE: return "RDMA_WRITE";
	case IBV_WR_RDMA_WRITE_WITH_IMM: return "RDMA_WRITE_WITH_IMM";
	case IBV_WR_SEND: return "SEND";
	case IBV_WR_SEND_WITH_IMM: return "SEND_WITH_IMM";
	case IBV_WR_RDMA_READ: return "RDMA_READ";
	case IBV_WR_ATOMIC_CMP_AND_SWP: return "ATOMIC_CMP_AND_SWP";
	case IBV_WR_ATOMIC_FETCH_AND_ADD: return "ATOMIC_FETCH_AND_ADD";
	default: return "unsupported opcode";
	}
}

const char *soft_qp_state_str(enum ibv_qp_state s)
{
	static const char *const n[] = {"RESET", "INIT", "RTR", "RTS", "SQD", "SQE", "ERR"};
	return (unsigned)s < sizeof n / sizeof n[0] ? n[s] : "?";
}

const char *ibv_node_type_str(enum ibv_node_type node_type)
{
	static const char *const s[] = {
		[IBV_NODE_CA] = "InfiniBand channel adapter",
		[IBV_NODE_SWITCH] = "InfiniBand switch",
		[IBV_NODE_ROUTER] = "InfiniBand router",
		[IBV_NODE_RNIC] = "iWARP NIC",
		[IBV_NODE_USNIC] = "usNIC",
		[IBV_NODE_USNIC_UDP] = "usNIC UDP",
		[IBV_NODE_UNSPECIFIED] = "unspecified",
	};
	if (node_type < IBV_NODE_CA || node_type > IBV_NODE_UNSPECIFIED)
		return "unknown";
	return s[node_type];
}

const char *ibv_port_state_str(enum ibv_port_state port_state)
{
	static const char *const s[] = {
		[IBV_PORT_NOP] = "no state change (NOP)",
		[IBV_PORT_DOWN] = "down",
		[IBV_PORT_INIT] = "init",
		[IBV_PORT_ARMED] = "armed",
		[IBV_PORT_ACTIVE] = "active",
		[IBV_PORT_ACTIVE_DEFER] = "active defer",
	};
	if (port_state < IBV_PORT_NOP || port_state > IBV_PORT_ACTIVE_DEFER)
		return "unknown";
	return s[port_state];
}

const char *ibv_event_type_str(enum ibv_event_type event)
{
	static const char *const s[] = {
		[IBV_EVENT_CQ_ERR] = "CQ error",
		[IBV_EVENT_QP_FATAL] = "local work queue catastrophic error",
		[IBV_EVENT_QP_REQ_ERR] = "invalid request local work queue error",
		[IBV_EVENT_QP_ACCESS_ERR] = "local access violation work queue error",
		[IBV_EVENT_COMM_EST] = "communication established",
		[IBV_EVENT_SQ_DRAINED] = "send queue drained",
		[IBV_EVENT_PATH_MIG] = "path migrated",
		[IBV_EVENT_PATH_MIG_ERR] = "path migration request error",
		[IBV_EVENT_DEVICE_FATAL] = "local catastrophic error",
		[IBV_EVENT_PORT_ACTIVE] = "port active",
		[IBV_EVENT_PORT_ERR] = "port error",
		[IBV_EVENT_LID_CHANGE] = "LID change",
		[IBV_EVENT_PKEY_CHANGE] = "P_Key change",
		[IBV_EVENT_SM_CHANGE] = "SM change",
		[IBV_EVENT_SRQ_ERR] = "SRQ catastrophic error",
		[IBV_EVENT_SRQ_LIMIT_REACHED] = "SRQ limit reached",
		[IBV_EVENT_QP_LAST_WQE_REACHED] = "last WQE reached",
		[IBV_EVENT_CLIENT_REREGISTER] = "client reregistration",
		[IBV_EVENT_GID_CHANGE] = "GID table change",
		[IBV_EVENT_WQ_FATAL] = "WQ fatal",
	};
	if (event < IBV_EVENT_CQ_ERR || event > IBV_EVENT_WQ_FATAL)
		return "unknown";
	return s[event];
}

const char *ibv_wc_status_str(enum ibv_wc_status status)
{
	static const char *const s[] = {
		[IBV_WC_SUCCESS] = "success",
		[IBV_WC_LOC_LEN_ERR] = "local length error",
		[IBV_WC_LOC_QP_OP_ERR] = "local QP operation error",
		[IBV_WC_LOC_EEC_OP_ERR] = "local EE context operation error",
		[IBV_WC_LOC_PROT_ERR] = "local protection error",
		[IBV_WC_WR_FLUSH_ERR] = "Work Request Flushed Error",
		[IBV_WC_MW_BIND_ERR] = "memory management operation error",
		[IBV_WC_BAD_RESP_ERR] = "bad response error",
		[IBV_WC_LOC_ACCESS_ERR] = "local access error",
		[IBV_WC_REM_INV_REQ_ERR] = "remote invalid request error",
		[IBV_WC_REM_ACCESS_ERR] = "remote access error",
		[IBV_WC_REM_OP_ERR] = "remote operation error",
		[IBV_WC_RETRY_EXC_ERR] = "transport retry counter exceeded",
		[IBV_WC_RNR_RETRY_EXC_ERR] = "RNR retry counter exceeded",
		[IBV_WC_LOC_RDD_VIOL_ERR] = "local RDD violation error",
		[IBV_WC_REM_INV_RD_REQ_ERR] = "remote invalid RD request",
		[IBV_WC_REM_ABORT_ERR] = "aborted error",
		[IBV_WC_INV_EECN_ERR] = "invalid EE context number",
		[IBV_WC_INV_EEC_STATE_ERR] = "invalid EE context state",
		[IBV_WC_FATAL_ERR] = "fatal error",
		[IBV_WC_RESP_TIMEOUT_ERR] = "response timeout error",
		[IBV_WC_GENERAL_ERR] = "general error",
		[IBV_WC_TM_ERR] = "TM error",
		[IBV_WC_TM_RNDV_INCOMPLETE] = "TM software rendezvous",
	};
	if (status < IBV_WC_SUCCESS || status > IBV_WC_TM_RNDV_INCOMPLETE)
		return "unknown";
	return s[status];
}

/* ------------------------------------------------------------------ rates */
static const struct {
	enum ibv_rate rate;
	int mult;
	int mbps;
} rates[] = {
	{IBV_RATE_2_5_GBPS, 1, 2500},	 {IBV_RATE_5_GBPS, 2, 5000},
	{IBV_RATE_10_GBPS, 4, 10000},	 {IBV_RATE_20_GBPS, 8, 20000},
	{IBV_RATE_30_GBPS, 12, 30000},	 {IBV_RATE_40_GBPS, 16, 40000},
	{IBV_RATE_60_GBPS, 24, 60000},	 {IBV_RATE_80_GBPS, 32, 80000},
	{IBV_RATE_120_GBPS, 48, 120000}, {IBV_RATE_14_GBPS, -1, 14062},
	{IBV_RATE_56_GBPS, -1, 56250},	 {IBV_RATE_112_GBPS, -1, 112500},
	{IBV_RATE_168_GBPS, -1, 168750}, {IBV_RATE_25_GBPS, -1, 25781},
	{IBV_RATE_100_GBPS, -1, 103125}, {IBV_RATE_200_GBPS, -1, 206250},
	{IBV_RATE_300_GBPS, -1, 309375}, {IBV_RATE_28_GBPS, -1, 28125},
	{IBV_RATE_50_GBPS, -1, 53125},	 {IBV_RATE_400_GBPS, -1, 412500},
	{IBV_RATE_600_GBPS, -1, 618750},
};
#define NRATES (sizeof rates / sizeof rates[0])

int ibv_rate_to_mult(enum ibv_rate rate)
{
	for (size_t i = 0; i < NRATES; i++)
		if (rates[i].rate == rate)
			return rates[i].mult;
	return -1;
}

enum ibv_rate mult_to_ibv_rate(int mult)
{
	for (size_t i = 0; i < NRATES; i++)
		if (rates[i].mult == mult && mult > 0)
			return rates[i].rate;
	return IBV_RATE_MAX;
}

int ibv_rate_to_mbps(enum ibv_rate rate)
{
	for (size_t i = 0; i < NRATES; i++)
		if (rates[i].rate == rate)
			return rates[i].mbps;
	return -1;
}

enum ibv_rate mbps_to_ibv_rate(int mbps)
{
	for (size_t i = 0; i < NRATES; i++)
		if (rates[i].mbps == mbps)
			return rates[i].rate;
	return IBV_RATE_MAX;
}
