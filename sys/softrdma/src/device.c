/* softrdma: devices, contexts, queries, protection domains, memory regions, completion
 * channels, completion queues and asynchronous events.
 *
 * Return conventions follow rdma-core 44 exactly: object constructors return NULL and
 * set errno; ibv_query_gid / ibv_query_pkey return -1; most other verbs return a
 * positive errno. */
#include "soft.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#undef ibv_query_port
#undef ibv_reg_mr
#undef ibv_reg_mr_iova
#undef ibv_get_device_list

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------ devices */
static struct soft_dev devs[SOFT_MAX_DEVICES];
static int ndevs;
static pthread_once_t devs_once = PTHREAD_ONCE_INIT;

static void eui64(uint8_t out[8], int i)
{
	/* MAC 02:50:53:00:00:ii -> EUI-64 0050:53ff:fe00:00ii with the U/L bit flipped */
	uint8_t mac[6] = {0x02, 0x50, 0x53, 0x00, 0x00, (uint8_t)(i + 1)};
	out[0] = mac[0] ^ 0x02;
	out[1] = mac[1];
	out[2] = mac[2];
	out[3] = 0xff;
	out[4] = 0xfe;
	out[5] = mac[3];
	out[6] = mac[4];
	out[7] = mac[5];
}

static void add_device(const char *name, int eth)
{
	if (ndevs >= SOFT_MAX_DEVICES) {
		soft_warn("SOFTRDMA_DEVICES: more than %d devices; '%s' ignored",
			  SOFT_MAX_DEVICES, name);
		return;
	}
	size_t nl = strlen(name);
	if (nl == 0 || nl >= IBV_SYSFS_NAME_MAX) {
		soft_warn("SOFTRDMA_DEVICES: bad device name '%s'; ignored", name);
		return;
	}
	for (int j = 0; j < ndevs; j++)
		if (!strcmp(devs[j].ibdev.name, name)) {
			soft_warn("SOFTRDMA_DEVICES: duplicate device '%s'; ignored", name);
			return;
		}
	struct soft_dev *d = &devs[ndevs];
	memset(d, 0, sizeof *d);
	d->index = ndevs;
	d->ibdev.node_type = IBV_NODE_CA;
	d->ibdev.transport_type = IBV_TRANSPORT_IB;
	snprintf(d->ibdev.name, sizeof d->ibdev.name, "%s", name);
	snprintf(d->ibdev.dev_name, sizeof d->ibdev.dev_name, "uverbs%d", ndevs);
	snprintf(d->ibdev.dev_path, sizeof d->ibdev.dev_path,
		 "/sys/class/infiniband_verbs/uverbs%d", ndevs);
	snprintf(d->ibdev.ibdev_path, sizeof d->ibdev.ibdev_path, "/sys/class/infiniband/%s",
		 name);
	uint8_t e[8];
	eui64(e, ndevs);
	uint64_t guid = 0;
	for (int k = 0; k < 8; k++)
		guid = (guid << 8) | e[k];
	d->node_guid = guid;
	d->max_mtu = IBV_MTU_4096;
	if (eth) {
		/* Like rxe on an IPv4 netdev: link-local and IPv4-mapped GIDs, each as
		 * RoCE v1 and v2; a 1500-byte netdev gives a 1024-byte active MTU; rxe's
		 * 8 MiB message limit. */
		d->link_layer = IBV_LINK_LAYER_ETHERNET;
		d->lid = 0;
		d->active_mtu = IBV_MTU_1024;
		d->max_msg_sz = 0x800000;
		union ibv_gid ll = {0}, v4 = {0};
		ll.raw[0] = 0xfe;
		ll.raw[1] = 0x80;
		memcpy(&ll.raw[8], e, 8);
		v4.raw[10] = 0xff;
		v4.raw[11] = 0xff;
		v4.raw[12] = 127;
		v4.raw[13] = 0;
		v4.raw[14] = 1;
		v4.raw[15] = (uint8_t)(ndevs + 1);
		d->gids[0] = ll;
		d->gid_types[0] = IBV_GID_TYPE_ROCE_V1;
		d->gids[1] = ll;
		d->gid_types[1] = IBV_GID_TYPE_ROCE_V2;
		d->gids[2] = v4;
		d->gid_types[2] = IBV_GID_TYPE_ROCE_V1;
		d->gids[3] = v4;
		d->gid_types[3] = IBV_GID_TYPE_ROCE_V2;
		d->ngids = 4;
	} else {
		d->link_layer = IBV_LINK_LAYER_INFINIBAND;
		d->lid = (uint16_t)(0x10 + ndevs);
		d->active_mtu = IBV_MTU_4096;
		d->max_msg_sz = 0x40000000;
		union ibv_gid g = {0};
		g.raw[0] = 0xfe;
		g.raw[1] = 0x80;
		memcpy(&g.raw[8], e, 8);
		d->gids[0] = g;
		d->gid_types[0] = IBV_GID_TYPE_IB;
		d->ngids = 1;
	}
	ndevs++;
}

static void check_memlock_limit(void)
{
	/* The real library's start-up warning, word for word. */
	struct rlimit rlim;
	if (!geteuid())
		return;
	if (getrlimit(RLIMIT_MEMLOCK, &rlim)) {
		fprintf(stderr, "libibverbs: Warning: getrlimit(RLIMIT_MEMLOCK) failed.");
		return;
	}
	if (rlim.rlim_cur <= 32768)
		fprintf(stderr,
			"libibverbs: Warning: RLIMIT_MEMLOCK is %llu bytes.\n"
			"    This will severely limit memory registrations.\n",
			(unsigned long long)rlim.rlim_cur);
}

static void init_devices(void)
{
	soft_init();
	const char *spec = getenv("SOFTRDMA_DEVICES");
	if (!spec)
		spec = "soft0:ib,soft1:eth";
	char *copy = strdup(spec), *save = NULL;
	if (copy) {
		for (char *tok = strtok_r(copy, ", ", &save); tok;
		     tok = strtok_r(NULL, ", ", &save)) {
			char *colon = strchr(tok, ':');
			int eth = 0;
			if (colon) {
				*colon = 0;
				if (!strcmp(colon + 1, "eth") || !strcmp(colon + 1, "roce"))
					eth = 1;
				else if (strcmp(colon + 1, "ib")) {
					soft_warn("SOFTRDMA_DEVICES: link layer '%s' of '%s' is "
						  "not ib or eth; ignored",
						  colon + 1, tok);
					continue;
				}
			}
			add_device(tok, eth);
		}
		free(copy);
	}
	const char *down = getenv("SOFTRDMA_PORT_DOWN");
	if (down && *down) {
		char *c = strdup(down), *s = NULL;
		for (char *tok = c ? strtok_r(c, ", ", &s) : NULL; tok;
		     tok = strtok_r(NULL, ", ", &s))
			for (int j = 0; j < ndevs; j++)
				if (!strcmp(devs[j].ibdev.name, tok))
					devs[j].port_down = 1;
		free(c);
	}
	check_memlock_limit();
	TRACE("devices: %d (SOFTRDMA_DEVICES=%s)", ndevs, spec);
}

int soft_devices(struct soft_dev ***out)
{
	pthread_once(&devs_once, init_devices);
	struct soft_dev **list = calloc((size_t)ndevs + 1, sizeof *list);
	if (!list)
		return -1;
	for (int i = 0; i < ndevs; i++)
		list[i] = &devs[i];
	*out = list;
	return ndevs;
}

struct soft_dev *soft_dev_by_index(int i)
{
	pthread_once(&devs_once, init_devices);
	return (i >= 0 && i < ndevs) ? &devs[i] : NULL;
}

static struct soft_dev *dev_of(struct ibv_device *d)
{
	pthread_once(&devs_once, init_devices);
	for (int i = 0; i < ndevs; i++)
		if (d == &devs[i].ibdev)
			return &devs[i];
	return NULL;
}

int soft_gid_lookup(const struct soft_dev *d, const union ibv_gid *gid, uint32_t *type)
{
	for (int i = 0; i < d->ngids; i++)
		if (!memcmp(d->gids[i].raw, gid->raw, 16) && (!type || d->gid_types[i] == *type))
			return i;
	return -1;
}

EXPORT struct ibv_device **ibv_get_device_list(int *num)
{
	struct soft_dev **list;
	int n = soft_devices(&list);
	if (n < 0) {
		errno = ENOMEM;
		return NULL;
	}
	if (num)
		*num = n;
	TRACE("ibv_get_device_list() = %d devices", n);
	return (struct ibv_device **)list;
}

EXPORT void ibv_free_device_list(struct ibv_device **list) { free(list); }

EXPORT const char *ibv_get_device_name(struct ibv_device *device) { return device->name; }

EXPORT __be64 ibv_get_device_guid(struct ibv_device *device)
{
	struct soft_dev *d = dev_of(device);
	return d ? htobe64(d->node_guid) : 0;
}

EXPORT int ibv_get_device_index(struct ibv_device *device)
{
	struct soft_dev *d = dev_of(device);
	return d ? d->index : -1;
}

/* ------------------------------------------------------------------ registries */
/* Live objects, for validating handles that come back through event files and for
 * the fork handler. */
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct soft_list live_ctxs = {&live_ctxs, &live_ctxs};
struct ctx_link {
	struct soft_list link;
	struct soft_ctx *ctx;
};

static int cq_live_locked(struct soft_cq *cq)
{
	struct soft_list *c, *o;
	list_for_each(c, &live_ctxs)
	{
		struct soft_ctx *ctx = container_of(c, struct ctx_link, link)->ctx;
		list_for_each(o, &ctx->cqs) if (container_of(o, struct soft_cq, link) == cq) return 1;
	}
	return 0;
}

static int qp_live_locked(struct soft_qp *qp)
{
	struct soft_list *c, *o;
	list_for_each(c, &live_ctxs)
	{
		struct soft_ctx *ctx = container_of(c, struct ctx_link, link)->ctx;
		list_for_each(o, &ctx->qps) if (container_of(o, struct soft_qp, link) == qp) return 1;
	}
	return 0;
}

/* ------------------------------------------------------------------ contexts */
int soft_query_port_ex(struct ibv_context *context, uint8_t port_num,
		       struct ibv_port_attr *port_attr, size_t port_attr_len);
static int soft_query_device_ex(struct ibv_context *context,
				const struct ibv_query_device_ex_input *input,
				struct ibv_device_attr_ex *attr, size_t attr_size);
int soft_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc);
int soft_req_notify_cq(struct ibv_cq *cq, int solicited_only);
int soft_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad);
int soft_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad);
struct ibv_qp *soft_create_qp_ex(struct ibv_context *context,
				 struct ibv_qp_init_attr_ex *attr);
int soft_destroy_all(struct soft_ctx *ctx);

static int soft_post_srq_recv(struct ibv_srq *srq, struct ibv_recv_wr *wr,
			      struct ibv_recv_wr **bad)
{
	(void)srq;
	*bad = wr;
	return EOPNOTSUPP;
}

static int compat_query_device(struct ibv_context *c, struct ibv_device_attr *a);
static int compat_query_port(struct ibv_context *c, uint8_t p,
			     struct _compat_ibv_port_attr *a);

static int ctx_ok(struct ibv_context *context)
{
	struct soft_ctx *ctx = to_ctx(context);
	if (ctx->dead) {
		errno = EIO;
		return 0;
	}
	return 1;
}

EXPORT struct ibv_context *ibv_open_device(struct ibv_device *device)
{
	struct soft_dev *d = dev_of(device);
	if (!d) {
		errno = ENODEV;
		TRACE("ibv_open_device(%p) = NULL: not a device of this library", (void *)device);
		return NULL;
	}
	if (soft_nic_start()) {
		TRACE("ibv_open_device(%s) = NULL: NIC start failed: %s", d->ibdev.name,
		      strerror(errno));
		return NULL;
	}
	struct soft_ctx *ctx = calloc(1, sizeof *ctx);
	struct ctx_link *cl = calloc(1, sizeof *cl);
	int pfd[2] = {-1, -1};
	if (!ctx || !cl || pipe2(pfd, O_CLOEXEC)) {
		int e = errno ? errno : ENOMEM;
		free(ctx);
		free(cl);
		errno = e;
		return NULL;
	}
	fcntl(pfd[1], F_SETFL, O_NONBLOCK);
	int cmd = open("/dev/null", O_RDWR | O_CLOEXEC);
	struct ibv_context *c = &ctx->vctx.context;
	ctx->dev = d;
	ctx->async_wfd = pfd[1];
	pthread_mutex_init(&ctx->lock, NULL);
	list_init(&ctx->pds);
	list_init(&ctx->mrs);
	list_init(&ctx->cqs);
	list_init(&ctx->qps);
	list_init(&ctx->channels);
	ctx->vctx.sz = sizeof(struct verbs_context);
	ctx->vctx.query_port = soft_query_port_ex;
	ctx->vctx.query_device_ex = soft_query_device_ex;
	ctx->vctx.create_qp_ex = soft_create_qp_ex;
	c->device = device;
	c->ops._compat_query_device = compat_query_device;
	c->ops._compat_query_port = compat_query_port;
	c->ops.poll_cq = soft_poll_cq;
	c->ops.req_notify_cq = soft_req_notify_cq;
	c->ops.post_send = soft_post_send;
	c->ops.post_recv = soft_post_recv;
	c->ops.post_srq_recv = soft_post_srq_recv;
	c->cmd_fd = cmd;
	c->async_fd = pfd[0];
	c->num_comp_vectors = SOFT_NUM_COMP_VECTORS;
	pthread_mutex_init(&c->mutex, NULL);
	c->abi_compat = __VERBS_ABI_IS_EXTENDED;
	cl->ctx = ctx;
	pthread_mutex_lock(&reg_lock);
	list_add_tail(&live_ctxs, &cl->link);
	pthread_mutex_unlock(&reg_lock);
	TRACE("ibv_open_device(%s) = %p", d->ibdev.name, (void *)c);
	return c;
}

EXPORT int ibv_close_device(struct ibv_context *context)
{
	struct soft_ctx *ctx = to_ctx(context);
	TRACE("ibv_close_device(%s)%s", ctx->dev->ibdev.name,
	      ctx->dead ? ": the parent's context, after fork" : "");
	/* As the kernel does when the device file closes: whatever is left goes. A child's
	 * copy of its parent's context owns nothing in this process but its copies of the
	 * descriptors: those close, the objects are left alone. */
	int left = ctx->dead ? 0 : soft_destroy_all(ctx);
	if (left)
		TRACE("ibv_close_device: destroyed %d objects still open", left);
	if (ctx->dead) {
		struct soft_list *p;
		list_for_each(p, &ctx->channels)
		{
			struct soft_channel *ch = container_of(p, struct soft_channel, link);
			close(ch->ch.fd);
			close(ch->wfd);
		}
	}
	pthread_mutex_lock(&reg_lock);
	struct soft_list *p, *t;
	list_for_each_safe(p, t, &live_ctxs)
	{
		struct ctx_link *cl = container_of(p, struct ctx_link, link);
		if (cl->ctx == ctx) {
			list_del(p);
			free(cl);
		}
	}
	pthread_mutex_unlock(&reg_lock);
	close(context->async_fd);
	close(ctx->async_wfd);
	if (context->cmd_fd >= 0)
		close(context->cmd_fd);
	free(ctx);
	return 0;
}

/* ------------------------------------------------------------------ queries */
static void fill_device_attr(struct soft_dev *d, struct ibv_device_attr *a)
{
	memset(a, 0, sizeof *a);
	snprintf(a->fw_ver, sizeof a->fw_ver, "%s", SOFT_VERSION);
	a->node_guid = htobe64(d->node_guid);
	a->sys_image_guid = htobe64(d->node_guid);
	a->max_mr_size = SOFT_MAX_MR_SIZE;
	a->page_size_cap = ~(uint64_t)0xfff;
	a->vendor_id = SOFT_VENDOR_ID;
	a->vendor_part_id = SOFT_VENDOR_PART;
	a->hw_ver = 1;
	a->max_qp = SOFT_MAX_QP;
	a->max_qp_wr = SOFT_MAX_QP_WR;
	a->device_cap_flags = IBV_DEVICE_RC_RNR_NAK_GEN | IBV_DEVICE_SYS_IMAGE_GUID |
			      IBV_DEVICE_PORT_ACTIVE_EVENT;
	a->max_sge = SOFT_MAX_SGE;
	a->max_sge_rd = SOFT_MAX_SGE;
	a->max_cq = SOFT_MAX_CQ;
	a->max_cqe = SOFT_MAX_CQE;
	a->max_mr = SOFT_MAX_MR;
	a->max_pd = SOFT_MAX_PD;
	a->max_qp_rd_atom = SOFT_MAX_RD_ATOM;
	a->max_res_rd_atom = SOFT_MAX_RD_ATOM * SOFT_MAX_QP;
	a->max_qp_init_rd_atom = SOFT_MAX_RD_ATOM;
	a->atomic_cap = IBV_ATOMIC_HCA;
	a->max_pkeys = 1;
	a->local_ca_ack_delay = 15;
	a->phys_port_cnt = 1;
}

EXPORT int ibv_query_device(struct ibv_context *context, struct ibv_device_attr *attr)
{
	if (!ctx_ok(context))
		return EIO;
	fill_device_attr(to_ctx(context)->dev, attr);
	TRACE("ibv_query_device(%s) = 0", to_ctx(context)->dev->ibdev.name);
	return 0;
}

static int compat_query_device(struct ibv_context *c, struct ibv_device_attr *a)
{
	return ibv_query_device(c, a);
}

static int soft_query_device_ex(struct ibv_context *context,
				const struct ibv_query_device_ex_input *input,
				struct ibv_device_attr_ex *attr, size_t attr_size)
{
	if (!ctx_ok(context))
		return EIO;
	if (input && input->comp_mask)
		return EINVAL;
	if (attr_size < offsetof(struct ibv_device_attr_ex, comp_mask) + sizeof(uint32_t))
		return EINVAL;
	struct ibv_device_attr_ex full;
	memset(&full, 0, sizeof full);
	fill_device_attr(to_ctx(context)->dev, &full.orig_attr);
	full.phys_port_cnt_ex = 1;
	memset(attr, 0, attr_size);
	memcpy(attr, &full, attr_size < sizeof full ? attr_size : sizeof full);
	TRACE("ibv_query_device_ex(%s, size %zu) = 0", to_ctx(context)->dev->ibdev.name,
	      attr_size);
	return 0;
}

int soft_query_port_ex(struct ibv_context *context, uint8_t port_num,
		       struct ibv_port_attr *port_attr, size_t port_attr_len)
{
	if (!ctx_ok(context))
		return EIO;
	struct soft_dev *d = to_ctx(context)->dev;
	if (port_num != 1) {
		TRACE("ibv_query_port(%s, port %u) = EINVAL: the device has one port",
		      d->ibdev.name, port_num);
		return EINVAL;
	}
	struct ibv_port_attr a;
	memset(&a, 0, sizeof a);
	a.state = d->port_down ? IBV_PORT_DOWN : IBV_PORT_ACTIVE;
	a.max_mtu = d->max_mtu;
	a.active_mtu = d->active_mtu;
	a.gid_tbl_len = SOFT_GID_TBL_LEN;
	a.port_cap_flags = IBV_PORT_CM_SUP | IBV_PORT_CAP_MASK2_SUP;
	if (d->link_layer == IBV_LINK_LAYER_ETHERNET)
		a.port_cap_flags |= IBV_PORT_IP_BASED_GIDS;
	else
		a.port_cap_flags |= IBV_PORT_SYS_IMAGE_GUID_SUP | IBV_PORT_EXTENDED_SPEEDS_SUP;
	a.max_msg_sz = d->max_msg_sz;
	a.pkey_tbl_len = 1;
	a.lid = d->lid;
	a.sm_lid = d->link_layer == IBV_LINK_LAYER_INFINIBAND ? 1 : 0;
	a.max_vl_num = d->link_layer == IBV_LINK_LAYER_INFINIBAND ? 4 : 1;
	a.subnet_timeout = 18;
	a.active_width = 2;  /* 4X */
	a.active_speed = 32; /* EDR */
	a.phys_state = d->port_down ? 3 : 5;
	a.link_layer = d->link_layer;
	/* Only the extended query (verbs_context::query_port) can carry this field. */
	a.port_cap_flags2 = IBV_PORT_LINK_WIDTH_2X_SUP | IBV_PORT_LINK_SPEED_HDR_SUP;
	memset(port_attr, 0, port_attr_len);
	memcpy(port_attr, &a, port_attr_len < sizeof a ? port_attr_len : sizeof a);
	TRACE("ibv_query_port(%s, 1, size %zu) = 0: %s, lid %u, mtu %u/%u", d->ibdev.name,
	      port_attr_len, ibv_port_state_str(a.state), a.lid, mtu_bytes(a.active_mtu),
	      mtu_bytes(a.max_mtu));
	return 0;
}

/* struct _compat_ibv_port_attr (rdma-core's verbs.c): ibv_port_attr up to `flags`. */
#define COMPAT_PORT_ATTR_LEN offsetof(struct ibv_port_attr, port_cap_flags2)
_Static_assert(COMPAT_PORT_ATTR_LEN == 48, "the compat port attributes are 48 bytes");

/* The exported IBVERBS_1.1 symbol: applications built against headers that predate
 * the extended query call this, and it fills only the 48-byte compat struct. */
EXPORT int ibv_query_port(struct ibv_context *context, uint8_t port_num,
			  struct _compat_ibv_port_attr *port_attr)
{
	return soft_query_port_ex(context, port_num, (struct ibv_port_attr *)port_attr,
				  COMPAT_PORT_ATTR_LEN);
}

static int compat_query_port(struct ibv_context *c, uint8_t p, struct _compat_ibv_port_attr *a)
{
	return ibv_query_port(c, p, a);
}

static int gid_entry(struct ibv_context *context, uint32_t port, uint32_t index,
		     struct ibv_gid_entry *e)
{
	if (!ctx_ok(context))
		return EIO;
	struct soft_dev *d = to_ctx(context)->dev;
	if (port != 1 || index >= SOFT_GID_TBL_LEN)
		return EINVAL;
	memset(e, 0, sizeof *e);
	e->gid_index = index;
	e->port_num = port;
	if ((int)index >= d->ngids)
		return ENODATA;
	e->gid = d->gids[index];
	e->gid_type = d->gid_types[index];
	e->ndev_ifindex = d->link_layer == IBV_LINK_LAYER_ETHERNET ? 1 : 0;
	return 0;
}

EXPORT int ibv_query_gid(struct ibv_context *context, uint8_t port_num, int index,
			 union ibv_gid *gid)
{
	struct ibv_gid_entry e;
	if (index < 0) {
		errno = EINVAL;
		return -1;
	}
	int rc = gid_entry(context, port_num, (uint32_t)index, &e);
	TRACE("ibv_query_gid(port %u, index %d) = %d", port_num, index, rc);
	if (rc == ENODATA) {
		memset(gid, 0, sizeof *gid);
		return 0;
	}
	if (rc) {
		errno = rc;
		return -1;
	}
	*gid = e.gid;
	return 0;
}

EXPORT int _ibv_query_gid_ex(struct ibv_context *context, uint32_t port_num,
			     uint32_t gid_index, struct ibv_gid_entry *entry, uint32_t flags,
			     size_t entry_size)
{
	if (flags)
		return EOPNOTSUPP;
	if (entry_size < sizeof(struct ibv_gid_entry))
		return EINVAL;
	int rc = gid_entry(context, port_num, gid_index, entry);
	TRACE("ibv_query_gid_ex(port %u, index %u) = %d", port_num, gid_index, rc);
	return rc;
}

EXPORT ssize_t _ibv_query_gid_table(struct ibv_context *context,
				    struct ibv_gid_entry *entries, size_t max_entries,
				    uint32_t flags, size_t entry_size)
{
	if (flags)
		return -EOPNOTSUPP;
	if (entry_size < sizeof(struct ibv_gid_entry))
		return -EINVAL;
	if (!ctx_ok(context))
		return -EIO;
	struct soft_dev *d = to_ctx(context)->dev;
	if ((size_t)d->ngids > max_entries)
		return -EINVAL;
	for (int i = 0; i < d->ngids; i++) {
		struct ibv_gid_entry *e =
			(struct ibv_gid_entry *)((char *)entries + (size_t)i * entry_size);
		memset(e, 0, entry_size);
		gid_entry(context, 1, (uint32_t)i, e);
	}
	return d->ngids;
}

/* IBVERBS_PRIVATE_34 (used by ibv_devinfo): 0 = "IB/RoCE v1", 1 = "RoCE v2". */
EXPORT int ibv_query_gid_type(struct ibv_context *context, uint8_t port_num,
			      unsigned int index, int *type)
{
	struct ibv_gid_entry e;
	int rc = gid_entry(context, port_num, index, &e);
	if (rc) {
		errno = rc;
		return -1;
	}
	*type = e.gid_type == IBV_GID_TYPE_ROCE_V2 ? 1 : 0;
	return 0;
}

EXPORT int ibv_query_pkey(struct ibv_context *context, uint8_t port_num, int index,
			  __be16 *pkey)
{
	if (!ctx_ok(context))
		return -1;
	if (port_num != 1 || index != 0) {
		errno = EINVAL;
		return -1;
	}
	*pkey = htobe16(0xffff);
	return 0;
}

EXPORT int ibv_get_pkey_index(struct ibv_context *context, uint8_t port_num, __be16 pkey)
{
	if (!ctx_ok(context))
		return -1;
	if (port_num == 1 && be16toh(pkey) == 0xffff)
		return 0;
	errno = ENOENT;
	return -1;
}

/* ------------------------------------------------------------------ sysfs */
EXPORT const char *ibv_get_sysfs_path(void) { return "/sys"; }

/* The device's sysfs files do not exist; serve the ones tools read from what the device
 * reports, and read any other path from the file system as the real library does. */
static int synth_sysfs(const char *dir, const char *file, char *buf, size_t size)
{
	for (int i = 0; i < ndevs; i++) {
		struct soft_dev *d = &devs[i];
		const char *p = d->ibdev.ibdev_path;
		size_t pl = strlen(p);
		int in_ibdev = !strncmp(dir, p, pl) && (dir[pl] == 0 || dir[pl] == '/');
		int in_uverbs = !strcmp(dir, d->ibdev.dev_path);
		if (!in_ibdev && !in_uverbs)
			continue;
		char path[512];
		snprintf(path, sizeof path, "%s/%s", dir + (in_ibdev ? pl : strlen(dir)), file);
		const char *rel = path[0] == '/' ? path + 1 : path;
		uint64_t g = d->node_guid;
		char guid[32];
		snprintf(guid, sizeof guid, "%04x:%04x:%04x:%04x", (unsigned)(g >> 48) & 0xffff,
			 (unsigned)(g >> 32) & 0xffff, (unsigned)(g >> 16) & 0xffff,
			 (unsigned)g & 0xffff);
		int n = -1;
		unsigned idx;
		if (in_uverbs && !strcmp(rel, "ibdev"))
			n = snprintf(buf, size, "%s\n", d->ibdev.name);
		else if (in_uverbs && !strcmp(rel, "abi_version"))
			n = snprintf(buf, size, "6\n");
		else if (!strcmp(rel, "node_desc"))
			n = snprintf(buf, size, "softrdma %s\n", d->ibdev.name);
		else if (!strcmp(rel, "fw_ver"))
			n = snprintf(buf, size, "%s\n", SOFT_VERSION);
		else if (!strcmp(rel, "board_id"))
			n = snprintf(buf, size, "SOFTRDMA%04d\n", d->index);
		else if (!strcmp(rel, "hw_rev"))
			n = snprintf(buf, size, "1\n");
		else if (!strcmp(rel, "hca_type"))
			n = snprintf(buf, size, "softrdma\n");
		else if (!strcmp(rel, "node_type"))
			n = snprintf(buf, size, "1: CA\n");
		else if (!strcmp(rel, "node_guid") || !strcmp(rel, "sys_image_guid"))
			n = snprintf(buf, size, "%s\n", guid);
		else if (!strcmp(rel, "ports/1/state"))
			n = snprintf(buf, size, "%s\n", d->port_down ? "1: DOWN" : "4: ACTIVE");
		else if (!strcmp(rel, "ports/1/link_layer"))
			n = snprintf(buf, size, "%s\n",
				     d->link_layer == IBV_LINK_LAYER_ETHERNET ? "Ethernet"
									       : "InfiniBand");
		else if (sscanf(rel, "ports/1/gid_attrs/types/%u", &idx) == 1 &&
			 idx < SOFT_GID_TBL_LEN) {
			if ((int)idx >= d->ngids) {
				errno = EINVAL;
				return -1;
			}
			n = snprintf(buf, size, "%s\n",
				     d->gid_types[idx] == IBV_GID_TYPE_ROCE_V2 ? "RoCE v2"
										: "IB/RoCE v1");
		}
		if (n < 0) {
			errno = ENOENT;
			return -1;
		}
		return n < (int)size ? n : (int)size - 1;
	}
	return -2;
}

EXPORT int ibv_read_sysfs_file(const char *dir, const char *file, char *buf, size_t size)
{
	pthread_once(&devs_once, init_devices);
	if (!size)
		return -1;
	int n = synth_sysfs(dir, file, buf, size);
	if (n != -2)
		return n;
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", dir, file);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t len = read(fd, buf, size);
	close(fd);
	if (len <= 0)
		return -1;
	if ((size_t)len == size)
		len--;
	buf[len] = 0;
	return (int)len;
}

/* ------------------------------------------------------------------ PDs */
EXPORT struct ibv_pd *ibv_alloc_pd(struct ibv_context *context)
{
	if (!ctx_ok(context))
		return NULL;
	struct soft_ctx *ctx = to_ctx(context);
	static uint32_t next_handle;
	pthread_mutex_lock(&ctx->lock);
	if (ctx->npd >= SOFT_MAX_PD) {
		pthread_mutex_unlock(&ctx->lock);
		errno = ENOMEM;
		return NULL;
	}
	struct soft_pd *pd = calloc(1, sizeof *pd);
	if (!pd) {
		pthread_mutex_unlock(&ctx->lock);
		errno = ENOMEM;
		return NULL;
	}
	pd->pd.context = context;
	pd->pd.handle = __atomic_add_fetch(&next_handle, 1, __ATOMIC_RELAXED);
	pd->ctx = ctx;
	list_add_tail(&ctx->pds, &pd->link);
	ctx->npd++;
	pthread_mutex_unlock(&ctx->lock);
	TRACE("ibv_alloc_pd() = pd %u", pd->pd.handle);
	return &pd->pd;
}

EXPORT int ibv_dealloc_pd(struct ibv_pd *ibpd)
{
	struct soft_pd *pd = to_pd(ibpd);
	struct soft_ctx *ctx = pd->ctx;
	if (ctx->dead)
		return EIO;
	pthread_mutex_lock(&ctx->lock);
	if (pd->users) {
		int u = pd->users;
		pthread_mutex_unlock(&ctx->lock);
		TRACE("ibv_dealloc_pd(pd %u) = EBUSY: %d memory regions or queue pairs use it",
		      ibpd->handle, u);
		return EBUSY;
	}
	list_del(&pd->link);
	ctx->npd--;
	pthread_mutex_unlock(&ctx->lock);
	TRACE("ibv_dealloc_pd(pd %u) = 0", ibpd->handle);
	free(pd);
	return 0;
}

/* ------------------------------------------------------------------ MRs */
static pthread_rwlock_t mr_lock = PTHREAD_RWLOCK_INITIALIZER;
#define MR_HASH 4096
static struct soft_mr *mr_hash[MR_HASH];
static uint64_t pinned_pages_total;
static int mr_count;
static uint32_t mr_next_index = 1;

void soft_mr_rdlock(void) { pthread_rwlock_rdlock(&mr_lock); }
void soft_mr_unlock(void) { pthread_rwlock_unlock(&mr_lock); }

struct soft_mr *soft_mr_find(uint32_t key)
{
	for (struct soft_mr *m = mr_hash[(key >> 8) % MR_HASH]; m; m = m->hnext)
		if (m->key == key)
			return m;
	return NULL;
}

static int has_ipc_lock(void)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2];
	memset(d, 0, sizeof d);
	if (syscall(SYS_capget, &h, d))
		return 0;
	return (d[CAP_IPC_LOCK / 32].effective >> (CAP_IPC_LOCK % 32)) & 1;
}

/* Whether [start, end) is mapped, readable, and (if `write`) writable, as
 * get_user_pages would require. 0, or EFAULT. */
static int check_mapping(uintptr_t start, uintptr_t end, int write)
{
	FILE *f = fopen("/proc/self/maps", "re");
	if (!f)
		return 0; /* cannot tell: let it through */
	char line[512];
	uintptr_t covered = start;
	int ok = 0;
	while (fgets(line, sizeof line, f)) {
		unsigned long lo, hi;
		char perms[8];
		if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3)
			continue;
		if (hi <= covered)
			continue;
		if (lo > covered)
			break; /* a hole */
		if (perms[0] != 'r' || (write && perms[1] != 'w'))
			break;
		covered = hi;
		if (covered >= end) {
			ok = 1;
			break;
		}
	}
	fclose(f);
	return ok ? 0 : EFAULT;
}

#define MR_ACCESS_KNOWN                                                                  \
	(IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |     \
	 IBV_ACCESS_REMOTE_ATOMIC | IBV_ACCESS_MW_BIND | IBV_ACCESS_ZERO_BASED |          \
	 IBV_ACCESS_ON_DEMAND | IBV_ACCESS_HUGETLB | IBV_ACCESS_OPTIONAL_RANGE)

static struct ibv_mr *reg_mr(struct ibv_pd *ibpd, void *addr, size_t length, uint64_t iova,
			     unsigned int access)
{
	struct soft_pd *pd = to_pd(ibpd);
	struct soft_ctx *ctx = pd->ctx;
	int err = 0;
	const char *why = "";
	access &= ~(unsigned)IBV_ACCESS_OPTIONAL_RANGE; /* no optional access bits */
	uintptr_t a = (uintptr_t)addr;
	long page = sysconf(_SC_PAGESIZE);
	uintptr_t lo = a & ~(uintptr_t)(page - 1);
	uintptr_t hi = (a + length + (uintptr_t)page - 1) & ~(uintptr_t)(page - 1);
	uint64_t pages = (hi - lo) / (uint64_t)page;
	int writable = !!(access & (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
				    IBV_ACCESS_REMOTE_ATOMIC | IBV_ACCESS_MW_BIND));
	if (ctx->dead) {
		err = EIO;
		why = "context of the parent process";
	} else if (access & ~(unsigned)MR_ACCESS_KNOWN) {
		err = EINVAL;
		why = "unknown access flags";
	} else if ((access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC)) &&
		   !(access & IBV_ACCESS_LOCAL_WRITE)) {
		err = EINVAL;
		why = "REMOTE_WRITE and REMOTE_ATOMIC need LOCAL_WRITE";
	} else if (access & IBV_ACCESS_ON_DEMAND) {
		err = EOPNOTSUPP;
		why = "no on-demand paging";
	} else if (length == 0 || a + length < a) {
		err = EINVAL;
		why = "empty or wrapping range";
	} else if (length > SOFT_MAX_MR_SIZE) {
		err = EINVAL;
		why = "longer than max_mr_size";
	} else if ((a & (uintptr_t)(page - 1)) != (iova & (uint64_t)(page - 1))) {
		/* the kernel's ib_uverbs_reg_mr: the HCA maps whole pages */
		err = EINVAL;
		why = "iova and address at different offsets in their page";
	} else if ((err = check_mapping(lo, hi, writable))) {
		why = writable ? "range not mapped writable" : "range not mapped";
	}
	if (err) {
		TRACE("ibv_reg_mr(pd %u, %p, %zu, access %#x) = NULL: %s (%s)", ibpd->handle,
		      addr, length, access, strerror(err), why);
		errno = err;
		return NULL;
	}
	struct soft_mr *mr = calloc(1, sizeof *mr);
	if (!mr) {
		errno = ENOMEM;
		return NULL;
	}
	pthread_rwlock_wrlock(&mr_lock);
	/* RLIMIT_MEMLOCK, charged to pinned pages as the kernel's ib_umem_get does. */
	struct rlimit rl;
	if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
	    !has_ipc_lock() && pinned_pages_total + pages > rl.rlim_cur / (uint64_t)page) {
		pthread_rwlock_unlock(&mr_lock);
		free(mr);
		TRACE("ibv_reg_mr(pd %u, %p, %zu) = NULL: ENOMEM (RLIMIT_MEMLOCK %llu bytes, "
		      "%llu pages pinned already, %llu more asked)",
		      ibpd->handle, addr, length, (unsigned long long)rl.rlim_cur,
		      (unsigned long long)pinned_pages_total, (unsigned long long)pages);
		errno = ENOMEM;
		return NULL;
	}
	if (mr_count >= SOFT_MAX_MR) {
		pthread_rwlock_unlock(&mr_lock);
		free(mr);
		errno = ENOMEM;
		return NULL;
	}
	uint32_t key;
	do {
		uint32_t idx = mr_next_index++ & 0xffffff;
		if (!idx)
			idx = mr_next_index++ & 0xffffff;
		key = (idx << 8) | (uint32_t)(soft_rand() & 0xff);
	} while (soft_mr_find(key));
	mr->key = key;
	mr->pd = pd;
	mr->addr = a;
	mr->len = length;
	mr->iova = iova;
	mr->access = (int)access;
	mr->pinned_pages = pages;
	mr->mr.context = ibpd->context;
	mr->mr.pd = ibpd;
	mr->mr.addr = addr;
	mr->mr.length = length;
	mr->mr.handle = key;
	mr->mr.lkey = key;
	mr->mr.rkey = key;
	mr->hnext = mr_hash[(key >> 8) % MR_HASH];
	mr_hash[(key >> 8) % MR_HASH] = mr;
	pinned_pages_total += pages;
	mr_count++;
	pthread_rwlock_unlock(&mr_lock);
	pthread_mutex_lock(&ctx->lock);
	pd->users++;
	list_add_tail(&ctx->mrs, &mr->link);
	ctx->nmr++;
	pthread_mutex_unlock(&ctx->lock);
	TRACE("ibv_reg_mr(pd %u, %p, %zu, iova %#" PRIx64 ", access %#x) = lkey/rkey %#x",
	      ibpd->handle, addr, length, iova, access, key);
	return &mr->mr;
}

EXPORT struct ibv_mr *ibv_reg_mr_iova2(struct ibv_pd *pd, void *addr, size_t length,
				       uint64_t iova, unsigned int access)
{
	return reg_mr(pd, addr, length, iova, access);
}

EXPORT struct ibv_mr *ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t length, int access)
{
	return reg_mr(pd, addr, length, (uintptr_t)addr, (unsigned)access);
}

EXPORT struct ibv_mr *ibv_reg_mr_iova(struct ibv_pd *pd, void *addr, size_t length,
				      uint64_t iova, int access)
{
	return reg_mr(pd, addr, length, iova, (unsigned)access);
}

static void mr_unhash_locked(struct soft_mr *mr)
{
	struct soft_mr **pp = &mr_hash[(mr->key >> 8) % MR_HASH];
	while (*pp && *pp != mr)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = mr->hnext;
	pinned_pages_total -= mr->pinned_pages;
	mr_count--;
}

static int dereg_mr(struct soft_mr *mr, int ctx_locked)
{
	struct soft_ctx *ctx = mr->pd->ctx;
	/* Taking the write lock waits for any NIC access to the region to end; after it no
	 * work request can reach the memory. */
	pthread_rwlock_wrlock(&mr_lock);
	mr_unhash_locked(mr);
	pthread_rwlock_unlock(&mr_lock);
	if (!ctx_locked)
		pthread_mutex_lock(&ctx->lock);
	mr->pd->users--;
	list_del(&mr->link);
	ctx->nmr--;
	if (!ctx_locked)
		pthread_mutex_unlock(&ctx->lock);
	free(mr);
	return 0;
}

EXPORT int ibv_dereg_mr(struct ibv_mr *ibmr)
{
	if (to_mr(ibmr)->pd->ctx->dead)
		return EIO; /* the parent's registration: not in this process's tables */
	TRACE("ibv_dereg_mr(key %#x)", ibmr->lkey);
	return dereg_mr(to_mr(ibmr), 0);
}

EXPORT int ibv_rereg_mr(struct ibv_mr *mr, int flags, struct ibv_pd *pd, void *addr,
			size_t length, int access)
{
	(void)pd;
	(void)addr;
	(void)length;
	(void)access;
	TRACE("ibv_rereg_mr(key %#x, flags %#x) = unsupported by this device", mr->lkey, flags);
	errno = EOPNOTSUPP;
	return IBV_REREG_MR_ERR_INPUT;
}

EXPORT struct ibv_mr *ibv_reg_dmabuf_mr(struct ibv_pd *pd, uint64_t offset, size_t length,
					uint64_t iova, int fd, int access)
{
	(void)pd;
	(void)offset;
	(void)length;
	(void)iova;
	(void)fd;
	(void)access;
	TRACE("ibv_reg_dmabuf_mr = unsupported by this device");
	errno = EOPNOTSUPP;
	return NULL;
}

/* ------------------------------------------------------------------ channels */
EXPORT struct ibv_comp_channel *ibv_create_comp_channel(struct ibv_context *context)
{
	if (!ctx_ok(context))
		return NULL;
	struct soft_ctx *ctx = to_ctx(context);
	struct soft_channel *ch = calloc(1, sizeof *ch);
	int p[2];
	if (!ch || pipe2(p, O_CLOEXEC)) {
		int e = errno ? errno : ENOMEM;
		free(ch);
		errno = e;
		return NULL;
	}
	fcntl(p[1], F_SETFL, O_NONBLOCK);
	ch->ch.context = context;
	ch->ch.fd = p[0];
	ch->ch.refcnt = 0;
	ch->ctx = ctx;
	ch->wfd = p[1];
	pthread_mutex_lock(&ctx->lock);
	list_add_tail(&ctx->channels, &ch->link);
	pthread_mutex_unlock(&ctx->lock);
	TRACE("ibv_create_comp_channel() = fd %d", p[0]);
	return &ch->ch;
}

static void channel_free(struct soft_channel *ch)
{
	list_del(&ch->link);
	close(ch->ch.fd);
	close(ch->wfd);
	free(ch);
}

EXPORT int ibv_destroy_comp_channel(struct ibv_comp_channel *channel)
{
	struct ibv_context *context = channel->context;
	struct soft_channel *ch = to_channel(channel);
	int ret = 0, fd = channel->fd;
	if (ch->ctx->dead)
		return EIO;
	pthread_mutex_lock(&context->mutex);
	if (channel->refcnt) {
		ret = EBUSY;
	} else {
		struct soft_ctx *ctx = ch->ctx;
		pthread_mutex_lock(&ctx->lock);
		channel_free(ch);
		pthread_mutex_unlock(&ctx->lock);
	}
	pthread_mutex_unlock(&context->mutex);
	TRACE("ibv_destroy_comp_channel(fd %d) = %d%s", fd, ret,
	      ret ? " (EBUSY: completion queues still use it)" : "");
	return ret;
}

/* ------------------------------------------------------------------ CQs */
EXPORT struct ibv_cq *ibv_create_cq(struct ibv_context *context, int cqe, void *cq_context,
				    struct ibv_comp_channel *channel, int comp_vector)
{
	if (!ctx_ok(context))
		return NULL;
	struct soft_ctx *ctx = to_ctx(context);
	int err = 0;
	if (cqe < 1 || cqe > SOFT_MAX_CQE)
		err = EINVAL;
	else if (comp_vector < 0 || comp_vector >= context->num_comp_vectors)
		err = EINVAL;
	else if (channel && channel->context != context)
		err = EINVAL;
	if (err) {
		TRACE("ibv_create_cq(cqe %d, vector %d) = NULL: EINVAL", cqe, comp_vector);
		errno = err;
		return NULL;
	}
	struct soft_cq *cq = calloc(1, sizeof *cq);
	if (cq) {
		cq->ring = calloc((size_t)cqe, sizeof *cq->ring);
		cq->ring_flags = calloc((size_t)cqe, 1);
	}
	if (!cq || !cq->ring || !cq->ring_flags) {
		if (cq) {
			free(cq->ring);
			free(cq->ring_flags);
		}
		free(cq);
		errno = ENOMEM;
		return NULL;
	}
	pthread_mutex_lock(&ctx->lock);
	if (ctx->ncq >= SOFT_MAX_CQ) {
		pthread_mutex_unlock(&ctx->lock);
		free(cq->ring);
		free(cq->ring_flags);
		free(cq);
		errno = ENOMEM;
		return NULL;
	}
	static uint32_t next_handle;
	cq->ctx = ctx;
	cq->cap = (uint32_t)cqe;
	pthread_mutex_init(&cq->lock, NULL);
	cq->cq.context = context;
	cq->cq.channel = channel;
	cq->cq.cq_context = cq_context;
	cq->cq.handle = __atomic_add_fetch(&next_handle, 1, __ATOMIC_RELAXED);
	cq->cq.cqe = cqe;
	cq->cq.comp_events_completed = 0;
	cq->cq.async_events_completed = 0;
	pthread_mutex_init(&cq->cq.mutex, NULL);
	pthread_cond_init(&cq->cq.cond, NULL);
	pthread_mutex_lock(&reg_lock);
	list_add_tail(&ctx->cqs, &cq->link);
	pthread_mutex_unlock(&reg_lock);
	ctx->ncq++;
	pthread_mutex_unlock(&ctx->lock);
	if (channel) {
		/* The real library counts the channel's users in ibv_create_cq. */
		pthread_mutex_lock(&context->mutex);
		++channel->refcnt;
		pthread_mutex_unlock(&context->mutex);
	}
	TRACE("ibv_create_cq(cqe %d, channel fd %d, vector %d) = cq %u", cqe,
	      channel ? channel->fd : -1, comp_vector, cq->cq.handle);
	return &cq->cq;
}

/* Remove this CQ's unread events from its channel (the kernel drops them when the CQ
 * is destroyed). Caller holds the context mutex. */
static void purge_channel_events(struct soft_cq *cq)
{
	struct ibv_comp_channel *ch = cq->cq.channel;
	if (!ch)
		return;
	int fl = fcntl(ch->fd, F_GETFL);
	fcntl(ch->fd, F_SETFL, fl | O_NONBLOCK);
	uint64_t keep[512], h;
	int nkeep = 0;
	while (read(ch->fd, &h, sizeof h) == (ssize_t)sizeof h) {
		if (h != (uint64_t)(uintptr_t)&cq->cq && nkeep < 512)
			keep[nkeep++] = h;
	}
	fcntl(ch->fd, F_SETFL, fl);
	for (int i = 0; i < nkeep; i++) {
		ssize_t w = write(to_channel(ch)->wfd, &keep[i], sizeof keep[i]);
		(void)w;
	}
}

static int destroy_cq(struct soft_cq *cq, int ctx_locked, int wait_events)
{
	struct soft_ctx *ctx = cq->ctx;
	if (!ctx_locked)
		pthread_mutex_lock(&ctx->lock);
	if (cq->users) {
		int u = cq->users;
		if (!ctx_locked)
			pthread_mutex_unlock(&ctx->lock);
		TRACE("ibv_destroy_cq(cq %u) = EBUSY: %d queue pairs use it", cq->cq.handle, u);
		return EBUSY;
	}
	pthread_mutex_lock(&reg_lock);
	list_del(&cq->link);
	pthread_mutex_unlock(&reg_lock);
	ctx->ncq--;
	if (!ctx_locked)
		pthread_mutex_unlock(&ctx->lock);
	/* The real library waits, without a bound, until every event handed out was
	 * acknowledged (ibv_ack_cq_events); so does this one, and says why it waits. */
	pthread_mutex_lock(&cq->cq.mutex);
	uint64_t t0 = soft_now_ns();
	int warned = 0;
	while (wait_events && (cq->cq.comp_events_completed != cq->events_reported ||
			       cq->cq.async_events_completed != cq->async_reported)) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 1;
		pthread_cond_timedwait(&cq->cq.cond, &cq->cq.mutex, &ts);
		if (!warned && soft_now_ns() - t0 > 1000000000ull) {
			soft_warn("ibv_destroy_cq(cq %u) is waiting for %u unacknowledged completion "
				  "events (ibv_ack_cq_events); the real library waits forever too",
				  cq->cq.handle, cq->events_reported - cq->cq.comp_events_completed);
			warned = 1;
		}
	}
	pthread_mutex_unlock(&cq->cq.mutex);
	struct ibv_comp_channel *ch = cq->cq.channel;
	if (ch) {
		pthread_mutex_lock(&ch->context->mutex);
		purge_channel_events(cq);
		--ch->refcnt;
		pthread_mutex_unlock(&ch->context->mutex);
	}
	TRACE("ibv_destroy_cq(cq %u) = 0", cq->cq.handle);
	free(cq->ring);
	free(cq->ring_flags);
	free(cq);
	return 0;
}

EXPORT int ibv_destroy_cq(struct ibv_cq *cq)
{
	if (to_cq(cq)->ctx->dead)
		return EIO;
	return destroy_cq(to_cq(cq), 0, 1);
}

EXPORT int ibv_resize_cq(struct ibv_cq *ibcq, int cqe)
{
	struct soft_cq *cq = to_cq(ibcq);
	if (cqe < 1 || cqe > SOFT_MAX_CQE)
		return EINVAL;
	struct ibv_wc *ring = calloc((size_t)cqe, sizeof *ring);
	uint8_t *fl = calloc((size_t)cqe, 1);
	if (!ring || !fl) {
		free(ring);
		free(fl);
		return ENOMEM;
	}
	pthread_mutex_lock(&cq->lock);
	if ((uint32_t)cqe < cq->count) {
		pthread_mutex_unlock(&cq->lock);
		free(ring);
		free(fl);
		return EINVAL;
	}
	for (uint32_t i = 0; i < cq->count; i++) {
		ring[i] = cq->ring[(cq->head + i) % cq->cap];
		fl[i] = cq->ring_flags[(cq->head + i) % cq->cap];
	}
	free(cq->ring);
	free(cq->ring_flags);
	cq->ring = ring;
	cq->ring_flags = fl;
	cq->head = 0;
	cq->cap = (uint32_t)cqe;
	ibcq->cqe = cqe;
	pthread_mutex_unlock(&cq->lock);
	TRACE("ibv_resize_cq(cq %u, %d) = 0", ibcq->handle, cqe);
	return 0;
}

int soft_poll_cq(struct ibv_cq *ibcq, int num_entries, struct ibv_wc *wc)
{
	struct soft_cq *cq = to_cq(ibcq);
	if (cq->ctx->dead)
		return -1; /* the parent's CQ: its lock may have been held across fork() */
	if (num_entries <= 0)
		return 0;
	pthread_mutex_lock(&cq->lock);
	int n = 0;
	while (n < num_entries && cq->count) {
		wc[n++] = cq->ring[cq->head];
		cq->head = (cq->head + 1) % cq->cap;
		cq->count--;
	}
	pthread_mutex_unlock(&cq->lock);
	if (n)
		for (int i = 0; i < n; i++)
			TRACE("ibv_poll_cq(cq %u): wr_id %#llx %s opcode %d len %u qp %#x",
			      ibcq->handle, (unsigned long long)wc[i].wr_id,
			      ibv_wc_status_str(wc[i].status), (int)wc[i].opcode, wc[i].byte_len,
			      wc[i].qp_num);
	return n;
}

int soft_req_notify_cq(struct ibv_cq *ibcq, int solicited_only)
{
	struct soft_cq *cq = to_cq(ibcq);
	if (cq->ctx->dead)
		return EIO;
	pthread_mutex_lock(&cq->lock);
	if (!cq->armed) {
		cq->armed = 1;
		cq->solicited_only = solicited_only;
	} else if (!solicited_only) {
		cq->solicited_only = 0;
	}
	pthread_mutex_unlock(&cq->lock);
	TRACE("ibv_req_notify_cq(cq %u, solicited %d)", ibcq->handle, solicited_only);
	return 0;
}

void soft_cq_push(struct soft_cq *cq, const struct ibv_wc *wc, int solicited)
{
	pthread_mutex_lock(&cq->lock);
	if (cq->count == cq->cap) {
		int first = !cq->overrun;
		cq->overrun = 1;
		pthread_mutex_unlock(&cq->lock);
		if (first) {
			soft_warn("CQ %u overrun: %u entries, none polled; the CQ and its queue "
				  "pairs are in error now",
				  cq->cq.handle, cq->cap);
			soft_async_event(cq->ctx, IBV_EVENT_CQ_ERR, (uintptr_t)&cq->cq);
			soft_nic_cq_overrun(cq);
		}
		return;
	}
	uint32_t at = (cq->head + cq->count) % cq->cap;
	cq->ring[at] = *wc;
	cq->ring_flags[at] = (uint8_t)solicited;
	cq->count++;
	if (cq->armed && (!cq->solicited_only || solicited || wc->status != IBV_WC_SUCCESS)) {
		cq->armed = 0;
		if (cq->cq.channel) {
			uint64_t h = (uint64_t)(uintptr_t)&cq->cq;
			ssize_t w = write(to_channel(cq->cq.channel)->wfd, &h, sizeof h);
			(void)w;
		}
	}
	pthread_mutex_unlock(&cq->lock);
}

EXPORT int ibv_get_cq_event(struct ibv_comp_channel *channel, struct ibv_cq **cq,
			    void **cq_context)
{
	for (;;) {
		uint64_t h;
		if (read(channel->fd, &h, sizeof h) != (ssize_t)sizeof h)
			return -1;
		struct soft_cq *scq = (struct soft_cq *)(uintptr_t)h;
		pthread_mutex_lock(&reg_lock);
		if (!cq_live_locked(scq)) {
			pthread_mutex_unlock(&reg_lock);
			continue; /* an event of a CQ destroyed meanwhile */
		}
		pthread_mutex_lock(&scq->cq.mutex);
		scq->events_reported++;
		pthread_mutex_unlock(&scq->cq.mutex);
		pthread_mutex_unlock(&reg_lock);
		*cq = &scq->cq;
		*cq_context = scq->cq.cq_context;
		TRACE("ibv_get_cq_event(fd %d) = cq %u", channel->fd, scq->cq.handle);
		return 0;
	}
}

EXPORT void ibv_ack_cq_events(struct ibv_cq *cq, unsigned int nevents)
{
	TRACE("ibv_ack_cq_events(cq %u, %u)", cq->handle, nevents);
	pthread_mutex_lock(&cq->mutex);
	cq->comp_events_completed += nevents;
	pthread_cond_signal(&cq->cond);
	pthread_mutex_unlock(&cq->mutex);
}

/* ------------------------------------------------------------------ async events */
struct async_desc {
	uint64_t element;
	uint32_t event_type;
	uint32_t reserved;
};

void soft_async_event(struct soft_ctx *ctx, enum ibv_event_type type, uint64_t element)
{
	struct async_desc d = {element, (uint32_t)type, 0};
	TRACE("async event: %s (%#llx)", ibv_event_type_str(type), (unsigned long long)element);
	ssize_t w = write(ctx->async_wfd, &d, sizeof d);
	(void)w;
}

static int is_qp_event(enum ibv_event_type t)
{
	switch (t) {
	case IBV_EVENT_QP_FATAL:
	case IBV_EVENT_QP_REQ_ERR:
	case IBV_EVENT_QP_ACCESS_ERR:
	case IBV_EVENT_COMM_EST:
	case IBV_EVENT_SQ_DRAINED:
	case IBV_EVENT_PATH_MIG:
	case IBV_EVENT_PATH_MIG_ERR:
	case IBV_EVENT_QP_LAST_WQE_REACHED: return 1;
	default: return 0;
	}
}

EXPORT int ibv_get_async_event(struct ibv_context *context, struct ibv_async_event *event)
{
	for (;;) {
		struct async_desc d;
		if (read(context->async_fd, &d, sizeof d) != (ssize_t)sizeof d)
			return -1;
		enum ibv_event_type t = (enum ibv_event_type)d.event_type;
		event->event_type = t;
		pthread_mutex_lock(&reg_lock);
		if (t == IBV_EVENT_CQ_ERR) {
			struct soft_cq *cq = (struct soft_cq *)(uintptr_t)d.element;
			if (!cq_live_locked(cq)) {
				pthread_mutex_unlock(&reg_lock);
				continue;
			}
			pthread_mutex_lock(&cq->cq.mutex);
			cq->async_reported++;
			pthread_mutex_unlock(&cq->cq.mutex);
			event->element.cq = &cq->cq;
		} else if (is_qp_event(t)) {
			struct soft_qp *qp = (struct soft_qp *)(uintptr_t)d.element;
			if (!qp_live_locked(qp)) {
				pthread_mutex_unlock(&reg_lock);
				continue;
			}
			pthread_mutex_lock(&qp->qp.mutex);
			qp->async_reported++;
			pthread_mutex_unlock(&qp->qp.mutex);
			event->element.qp = &qp->qp;
		} else {
			event->element.port_num = (int)d.element;
		}
		pthread_mutex_unlock(&reg_lock);
		return 0;
	}
}

EXPORT void ibv_ack_async_event(struct ibv_async_event *event)
{
	if (event->event_type == IBV_EVENT_CQ_ERR) {
		struct ibv_cq *cq = event->element.cq;
		pthread_mutex_lock(&cq->mutex);
		++cq->async_events_completed;
		pthread_cond_signal(&cq->cond);
		pthread_mutex_unlock(&cq->mutex);
	} else if (is_qp_event(event->event_type)) {
		struct ibv_qp *qp = event->element.qp;
		pthread_mutex_lock(&qp->mutex);
		++qp->events_completed;
		pthread_cond_signal(&qp->cond);
		pthread_mutex_unlock(&qp->mutex);
	}
}

/* Used by ibv_destroy_qp (qp.c): register / unregister in the live set. */
void soft_qp_register(struct soft_ctx *ctx, struct soft_qp *qp)
{
	pthread_mutex_lock(&reg_lock);
	list_add_tail(&ctx->qps, &qp->link);
	pthread_mutex_unlock(&reg_lock);
}

void soft_qp_unregister(struct soft_qp *qp)
{
	pthread_mutex_lock(&reg_lock);
	list_del(&qp->link);
	pthread_mutex_unlock(&reg_lock);
}

/* ------------------------------------------------------------------ teardown */
int soft_destroy_qp_internal(struct soft_qp *qp, int wait_events);

int soft_destroy_all(struct soft_ctx *ctx)
{
	int n = 0;
	for (;;) {
		pthread_mutex_lock(&ctx->lock);
		if (list_empty(&ctx->qps)) {
			pthread_mutex_unlock(&ctx->lock);
			break;
		}
		struct soft_qp *qp = container_of(ctx->qps.next, struct soft_qp, link);
		pthread_mutex_unlock(&ctx->lock);
		soft_destroy_qp_internal(qp, 0);
		n++;
	}
	pthread_mutex_lock(&ctx->lock);
	while (!list_empty(&ctx->cqs)) {
		destroy_cq(container_of(ctx->cqs.next, struct soft_cq, link), 1, 0);
		n++;
	}
	while (!list_empty(&ctx->mrs)) {
		dereg_mr(container_of(ctx->mrs.next, struct soft_mr, link), 1);
		n++;
	}
	while (!list_empty(&ctx->pds)) {
		struct soft_pd *pd = container_of(ctx->pds.next, struct soft_pd, link);
		list_del(&pd->link);
		free(pd);
		n++;
	}
	while (!list_empty(&ctx->channels)) {
		channel_free(container_of(ctx->channels.next, struct soft_channel, link));
		n++;
	}
	pthread_mutex_unlock(&ctx->lock);
	return n;
}

/* ------------------------------------------------------------------ fork */
static int fork_inited;

EXPORT int ibv_fork_init(void)
{
	fork_inited = 1;
	return 0;
}

EXPORT enum ibv_fork_status ibv_is_fork_initialized(void)
{
	/* Kernels since 5.13 keep pinned pages intact across fork. */
	return IBV_FORK_UNNEEDED;
}

EXPORT int ibv_dontfork_range(void *base, size_t size)
{
	if (!fork_inited)
		return 0;
	return madvise(base, size, MADV_DONTFORK) ? errno : 0;
}

EXPORT int ibv_dofork_range(void *base, size_t size)
{
	if (!fork_inited)
		return 0;
	return madvise(base, size, MADV_DOFORK) ? errno : 0;
}

/* fork() copies the locks as they are: one held by another thread (the NIC thread holds
 * the MR read lock while it moves data, and the random generator's lock for every
 * completion) would stay held forever in the child. The forking thread takes them
 * first, so that the child gets them in a known state. */
static void atfork_prepare(void)
{
	pthread_mutex_lock(&reg_lock);
	pthread_rwlock_wrlock(&mr_lock);
	soft_rand_lock();
}

static void atfork_parent(void)
{
	soft_rand_unlock();
	pthread_rwlock_unlock(&mr_lock);
	pthread_mutex_unlock(&reg_lock);
}

static void atfork_child(void)
{
	/* Not unlocked but made anew: a write-locked rwlock remembers its owner's thread
	 * id, which is not this thread's in the child. */
	soft_rand_after_fork();
	pthread_rwlock_init(&mr_lock, NULL);
	pthread_mutex_init(&reg_lock, NULL);
	/* The child has the parent's memory but not its NIC thread; its copies of the
	 * parent's contexts are unusable (like the real device files after fork). */
	struct soft_list *c;
	list_for_each(c, &live_ctxs) container_of(c, struct ctx_link, link)->ctx->dead = 1;
	/* Its memory regions are its own too: the parent's registrations pin nothing in
	 * the child (the kernel starts a new mm with nothing pinned, so RLIMIT_MEMLOCK is
	 * charged from 0) and their keys do not address the child's memory. */
	memset(mr_hash, 0, sizeof mr_hash);
	pinned_pages_total = 0;
	mr_count = 0;
	soft_qp_after_fork();
	soft_nic_after_fork();
}

__attribute__((constructor)) static void soft_lib_init(void)
{
	soft_init();
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* ------------------------------------------------------------------ unsupported */
/* What this device does not emulate fails the way a device without the feature
 * does, and the trace says so. */
#define UNSUPPORTED(name) TRACE("%s: not supported by this device", name)

EXPORT struct ibv_srq *ibv_create_srq(struct ibv_pd *pd, struct ibv_srq_init_attr *a)
{
	(void)pd;
	(void)a;
	UNSUPPORTED("ibv_create_srq");
	errno = EOPNOTSUPP;
	return NULL;
}
EXPORT int ibv_modify_srq(struct ibv_srq *s, struct ibv_srq_attr *a, int m)
{
	(void)s;
	(void)a;
	(void)m;
	return EOPNOTSUPP;
}
EXPORT int ibv_query_srq(struct ibv_srq *s, struct ibv_srq_attr *a)
{
	(void)s;
	(void)a;
	return EOPNOTSUPP;
}
EXPORT int ibv_destroy_srq(struct ibv_srq *s)
{
	(void)s;
	return EOPNOTSUPP;
}
EXPORT struct ibv_ah *ibv_create_ah(struct ibv_pd *pd, struct ibv_ah_attr *a)
{
	(void)pd;
	(void)a;
	UNSUPPORTED("ibv_create_ah (UD)");
	errno = EOPNOTSUPP;
	return NULL;
}
EXPORT int ibv_destroy_ah(struct ibv_ah *ah)
{
	(void)ah;
	return EOPNOTSUPP;
}
EXPORT int ibv_init_ah_from_wc(struct ibv_context *c, uint8_t p, struct ibv_wc *wc,
			       struct ibv_grh *grh, struct ibv_ah_attr *a)
{
	(void)c;
	(void)p;
	(void)wc;
	(void)grh;
	(void)a;
	errno = EOPNOTSUPP;
	return -1;
}
EXPORT struct ibv_ah *ibv_create_ah_from_wc(struct ibv_pd *pd, struct ibv_wc *wc,
					    struct ibv_grh *grh, uint8_t port)
{
	(void)pd;
	(void)wc;
	(void)grh;
	(void)port;
	errno = EOPNOTSUPP;
	return NULL;
}
EXPORT int ibv_attach_mcast(struct ibv_qp *qp, const union ibv_gid *gid, uint16_t lid)
{
	(void)qp;
	(void)gid;
	(void)lid;
	UNSUPPORTED("ibv_attach_mcast");
	return EOPNOTSUPP;
}
EXPORT int ibv_detach_mcast(struct ibv_qp *qp, const union ibv_gid *gid, uint16_t lid)
{
	(void)qp;
	(void)gid;
	(void)lid;
	return EOPNOTSUPP;
}
EXPORT int ibv_resolve_eth_l2_from_gid(struct ibv_context *c, struct ibv_ah_attr *a,
				       uint8_t eth_mac[6], uint16_t *vid)
{
	(void)c;
	(void)a;
	(void)eth_mac;
	(void)vid;
	return EOPNOTSUPP;
}
EXPORT struct ibv_context *ibv_import_device(int cmd_fd)
{
	(void)cmd_fd;
	errno = EOPNOTSUPP;
	return NULL;
}
EXPORT struct ibv_pd *ibv_import_pd(struct ibv_context *c, uint32_t h)
{
	(void)c;
	(void)h;
	errno = EOPNOTSUPP;
	return NULL;
}
EXPORT void ibv_unimport_pd(struct ibv_pd *pd) { (void)pd; }
EXPORT struct ibv_mr *ibv_import_mr(struct ibv_pd *pd, uint32_t h)
{
	(void)pd;
	(void)h;
	errno = EOPNOTSUPP;
	return NULL;
}
EXPORT void ibv_unimport_mr(struct ibv_mr *mr) { (void)mr; }
EXPORT struct ibv_dm *ibv_import_dm(struct ibv_context *c, uint32_t h)
{
	(void)c;
	(void)h;
	errno = EOPNOTSUPP;
	return NULL;
}
EXPORT void ibv_unimport_dm(struct ibv_dm *dm) { (void)dm; }
EXPORT int ibv_set_ece(struct ibv_qp *qp, struct ibv_ece *ece)
{
	(void)qp;
	(void)ece;
	return EOPNOTSUPP;
}
EXPORT int ibv_query_ece(struct ibv_qp *qp, struct ibv_ece *ece)
{
	(void)qp;
	(void)ece;
	return EOPNOTSUPP;
}
EXPORT void ibv_register_driver(const char *name, void *init_func)
{
	(void)name;
	(void)init_func;
}
