/* softrdma conformance tests: what ../README.md promises, checked through the public
 * libibverbs API (the real <infiniband/verbs.h>, linked against the library under test).
 *
 *   conformance                 run every test, then every environment group (each in a
 *                               re-executed copy of this binary with its SOFTRDMA_* set)
 *   conformance NAME...         run only the tests whose name starts with NAME
 *   conformance --group G       run environment group G (its variables must be set);
 *                               "--group default" runs the default tests in the
 *                               environment as it is (for debugging with SOFTRDMA_TRACE)
 *   conformance --list          list the tests
 *
 * One line per test (ok / FAIL and why), a summary, exit status 1 if anything failed. */
#include "harness.h"

#include <pthread.h>

/* (ibv_query_port)(...) calls the exported IBVERBS_1.1 symbol; ibv_query_port(...) is the
 * header's inline wrapper that goes through verbs_get_ctx(ctx)->query_port. */

#define MiB (1024u * 1024u)
#define KiB 1024u
#define ALL_ACCESS                                                                        \
	(IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |      \
	 IBV_ACCESS_REMOTE_ATOMIC)

/* ================================================================== 1. devices */
static void t_dev_list(const void *arg)
{
	(void)arg;
	int n = -1;
	struct ibv_device **l = ibv_get_device_list(&n);
	CHECK(l);
	EQ(n, 2);
	CHECK(l[2] == NULL);
	CHECK(!strcmp(ibv_get_device_name(l[0]), "soft0"));
	CHECK(!strcmp(ibv_get_device_name(l[1]), "soft1"));
	EQ(l[0]->node_type, IBV_NODE_CA);
	EQ(l[0]->transport_type, IBV_TRANSPORT_IB);
	CHECK(ibv_get_device_guid(l[0]) != 0);
	CHECK(ibv_get_device_guid(l[0]) != ibv_get_device_guid(l[1]));
	EQ(ibv_get_device_index(l[0]), 0);
	EQ(ibv_get_device_index(l[1]), 1);
	static const struct {
		uint8_t ll;
		uint16_t lid;
		enum ibv_mtu active;
		uint32_t max_msg;
	} want[2] = {{IBV_LINK_LAYER_INFINIBAND, 0x10, IBV_MTU_4096, 1u << 30},
		     {IBV_LINK_LAYER_ETHERNET, 0, IBV_MTU_1024, 8u << 20}};
	for (int i = 0; i < 2; i++) {
		struct ibv_context *ctx = ibv_open_device(l[i]);
		CHECK(ctx);
		CHECK(ctx->device == l[i]);
		struct ibv_port_attr pa;
		EQ_ERR(ibv_query_port(ctx, 1, &pa), 0);
		EQ(pa.link_layer, want[i].ll);
		EQ(pa.state, IBV_PORT_ACTIVE);
		EQ(pa.lid, want[i].lid);
		EQ(pa.max_mtu, IBV_MTU_4096);
		EQ(pa.active_mtu, want[i].active);
		EQ(pa.max_msg_sz, want[i].max_msg);
		CHECK(pa.gid_tbl_len >= 4);
		EQ(pa.pkey_tbl_len, 1);
		EQ_ERR(ibv_close_device(ctx), 0);
	}
	ibv_free_device_list(l);
}

static void t_dev_none(const void *arg)
{
	(void)arg;
	const char *v = getenv("SOFTRDMA_DEVICES");
	CHECKM(v && !*v, "needs SOFTRDMA_DEVICES set to an empty value");
	int n = -1;
	struct ibv_device **l = ibv_get_device_list(&n);
	CHECKM(l, "an empty list, not NULL, is expected: %s", strerror(errno));
	EQ(n, 0);
	CHECK(l[0] == NULL);
	ibv_free_device_list(l);
}

static void t_dev_custom(const void *arg)
{
	(void)arg;
	int n = -1;
	struct ibv_device **l = ibv_get_device_list(&n);
	CHECK(l);
	EQ(n, 3);
	static const char *const names[] = {"a0", "b1", "c2"};
	static const uint8_t ll[] = {IBV_LINK_LAYER_INFINIBAND, IBV_LINK_LAYER_ETHERNET,
				     IBV_LINK_LAYER_INFINIBAND};
	for (int i = 0; i < 3; i++) {
		CHECKM(!strcmp(ibv_get_device_name(l[i]), names[i]), "device %d is %s", i,
		       ibv_get_device_name(l[i]));
		struct ibv_context *ctx = ibv_open_device(l[i]);
		CHECK(ctx);
		struct ibv_port_attr pa;
		EQ_ERR(ibv_query_port(ctx, 1, &pa), 0);
		EQ(pa.link_layer, ll[i]);
		ibv_close_device(ctx);
	}
	ibv_free_device_list(l);
}

static void t_port_down(const void *arg)
{
	(void)arg;
	CHECKM(getenv("SOFTRDMA_PORT_DOWN"), "needs SOFTRDMA_PORT_DOWN=soft1");
	struct ibv_context *c0 = open_dev("soft0"), *c1 = open_dev("soft1");
	struct ibv_port_attr pa;
	EQ_ERR(ibv_query_port(c0, 1, &pa), 0);
	EQ(pa.state, IBV_PORT_ACTIVE);
	EQ_ERR(ibv_query_port(c1, 1, &pa), 0);
	EQ(pa.state, IBV_PORT_DOWN);
	CHECK(pa.phys_state != 5); /* not LinkUp */
	struct ibv_port_attr compat;
	memset(&compat, 0, sizeof compat);
	EQ_ERR((ibv_query_port)(c1, 1, (struct _compat_ibv_port_attr *)&compat), 0);
	EQ(compat.state, IBV_PORT_DOWN);
	ibv_close_device(c0);
	ibv_close_device(c1);
}

static void t_query_device(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	CHECK(ctx->abi_compat == (void *)UINTPTR_MAX);
	struct ibv_device_attr a;
	memset(&a, 0xff, sizeof a);
	EQ_ERR(ibv_query_device(ctx, &a), 0);
	EQ(a.max_qp, 4096);
	EQ(a.max_qp_wr, 16384);
	EQ(a.max_sge, 16);
	EQ(a.max_cqe, 65535);
	EQ(a.max_qp_rd_atom, 16);
	EQ(a.max_qp_init_rd_atom, 16);
	EQ(a.atomic_cap, IBV_ATOMIC_HCA);
	EQ(a.phys_port_cnt, 1);
	CHECK(a.max_mr_size >= (1ull << 32));
	CHECK(a.node_guid == ibv_get_device_guid(ctx->device));
	CHECK(a.fw_ver[0] != 0);
	struct ibv_device_attr_ex ax;
	memset(&ax, 0xff, sizeof ax);
	EQ_ERR(ibv_query_device_ex(ctx, NULL, &ax), 0);
	EQ(ax.orig_attr.max_qp_wr, 16384);
	EQ(ax.orig_attr.atomic_cap, IBV_ATOMIC_HCA);
	CHECK(ax.orig_attr.node_guid == a.node_guid);
	EQ_ERR(ibv_close_device(ctx), 0);
}

/* The exported ibv_query_port@IBVERBS_1.1 fills the 48-byte compat struct only. */
static void t_query_port_compat(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	uint8_t buf[48 + 64];
	memset(buf, 0xa5, sizeof buf);
	EQ_ERR((ibv_query_port)(ctx, 1, (struct _compat_ibv_port_attr *)buf), 0);
	for (size_t i = 48; i < sizeof buf; i++)
		CHECKM(buf[i] == 0xa5, "ibv_query_port (compat) wrote byte %zu of a 48-byte struct",
		       i);
	struct ibv_port_attr c, full;
	memset(&c, 0, sizeof c);
	memcpy(&c, buf, 48);
	EQ_ERR(ibv_query_port(ctx, 1, &full), 0);
	EQ(c.state, full.state);
	EQ(c.max_mtu, full.max_mtu);
	EQ(c.active_mtu, full.active_mtu);
	EQ(c.gid_tbl_len, full.gid_tbl_len);
	EQ(c.port_cap_flags, full.port_cap_flags);
	EQ(c.max_msg_sz, full.max_msg_sz);
	EQ(c.lid, full.lid);
	EQ(c.link_layer, full.link_layer);
	memset(buf, 0xa5, sizeof buf);
	EQ_ERR((ibv_query_port)(ctx, 2, (struct _compat_ibv_port_attr *)buf), EINVAL);
	ibv_close_device(ctx);
}

/* The extended query through verbs_get_ctx(ctx)->query_port, as the header's inline
 * ibv_query_port does, fills the whole struct including port_cap_flags2. */
static void t_query_port_ex(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct verbs_context *v = verbs_get_ctx(ctx);
	CHECKM(v, "verbs_get_ctx() is NULL: abi_compat is not __VERBS_ABI_IS_EXTENDED");
	CHECK(v->sz >= sizeof(struct verbs_context));
	CHECK(v->query_port != NULL);
	CHECK(&v->context == ctx);
	struct {
		struct ibv_port_attr a;
		uint8_t canary[32];
	} s;
	memset(&s, 0x5a, sizeof s);
	EQ_ERR(v->query_port(ctx, 1, &s.a, sizeof s.a), 0);
	CHECKM(s.a.port_cap_flags2 != 0, "port_cap_flags2 is 0 through the extended query");
	CHECK(s.a.port_cap_flags & IBV_PORT_CAP_MASK2_SUP);
	for (size_t i = 0; i < sizeof s.canary; i++)
		CHECK(s.canary[i] == 0x5a);
	struct ibv_port_attr pa;
	memset(&pa, 0, sizeof pa);
	EQ_ERR(ibv_query_port(ctx, 1, &pa), 0);
	CHECK(pa.port_cap_flags2 != 0);
	EQ_ERR(v->query_port(ctx, 0, &s.a, sizeof s.a), EINVAL);
	EQ_ERR(v->query_port(ctx, 2, &s.a, sizeof s.a), EINVAL);
	ibv_close_device(ctx);
}

static void t_query_gid(const void *arg)
{
	(void)arg;
	static const uint8_t zero[16];
	/* soft0: one IB GID, fe80::<EUI-64> */
	struct ibv_context *c0 = open_dev("soft0");
	union ibv_gid g;
	EQ(ibv_query_gid(c0, 1, 0, &g), 0);
	CHECK(g.raw[0] == 0xfe && g.raw[1] == 0x80);
	CHECK(memcmp(g.raw + 8, zero, 8) != 0);
	memset(&g, 0xee, sizeof g);
	EQ(ibv_query_gid(c0, 1, 1, &g), 0); /* an empty entry: 0 and an all-zero GID */
	CHECK(!memcmp(g.raw, zero, 16));
	EQ(ibv_query_gid(c0, 1, 15, &g), 0);
	EQ(ibv_query_gid(c0, 1, 16, &g), -1); /* beyond gid_tbl_len */
	EQ(ibv_query_gid(c0, 1, -1, &g), -1);
	EQ(ibv_query_gid(c0, 2, 0, &g), -1);
	struct ibv_gid_entry e;
	memset(&e, 0xee, sizeof e);
	EQ_ERR(ibv_query_gid_ex(c0, 1, 0, &e, 0), 0);
	EQ(e.gid_type, IBV_GID_TYPE_IB);
	EQ(e.gid_index, 0);
	EQ(e.port_num, 1);
	EQ(ibv_query_gid(c0, 1, 0, &g), 0);
	CHECK(!memcmp(e.gid.raw, g.raw, 16));
	EQ_ERR(ibv_query_gid_ex(c0, 1, 1, &e, 0), ENODATA);
	EQ_ERR(ibv_query_gid_ex(c0, 1, 16, &e, 0), EINVAL);
	struct ibv_gid_entry tbl[16];
	EQ(ibv_query_gid_table(c0, tbl, 16, 0), 1);
	/* soft1: link-local and IPv4-mapped GIDs, each as RoCE v1 and v2 */
	struct ibv_context *c1 = open_dev("soft1");
	static const uint32_t types[4] = {IBV_GID_TYPE_ROCE_V1, IBV_GID_TYPE_ROCE_V2,
					  IBV_GID_TYPE_ROCE_V1, IBV_GID_TYPE_ROCE_V2};
	union ibv_gid gs[4];
	for (int i = 0; i < 4; i++) {
		EQ(ibv_query_gid(c1, 1, i, &gs[i]), 0);
		CHECK(memcmp(gs[i].raw, zero, 16) != 0);
		EQ_ERR(ibv_query_gid_ex(c1, 1, (uint32_t)i, &e, 0), 0);
		EQ(e.gid_type, types[i]);
		CHECK(!memcmp(e.gid.raw, gs[i].raw, 16));
	}
	CHECK(!memcmp(gs[0].raw, gs[1].raw, 16) && gs[0].raw[0] == 0xfe);
	CHECK(!memcmp(gs[2].raw, gs[3].raw, 16));
	CHECK(gs[2].raw[10] == 0xff && gs[2].raw[11] == 0xff && gs[2].raw[12] == 127);
	EQ(ibv_query_gid(c1, 1, 4, &g), 0);
	CHECK(!memcmp(g.raw, zero, 16));
	EQ_ERR(ibv_query_gid_ex(c1, 1, 4, &e, 0), ENODATA);
	EQ(ibv_query_gid_table(c1, tbl, 16, 0), 4);
	for (int i = 0; i < 4; i++)
		EQ(tbl[i].gid_type, types[i]);
	ibv_close_device(c0);
	ibv_close_device(c1);
}

static void t_query_pkey(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	__be16 pk = 0;
	EQ(ibv_query_pkey(ctx, 1, 0, &pk), 0);
	EQ(pk, htobe16(0xffff));
	EQ(ibv_query_pkey(ctx, 1, 1, &pk), -1);
	EQ(ibv_query_pkey(ctx, 2, 0, &pk), -1);
	EQ(ibv_get_pkey_index(ctx, 1, htobe16(0xffff)), 0);
	EQ(ibv_get_pkey_index(ctx, 1, htobe16(0x1234)), -1);
	ibv_close_device(ctx);
}

/* ================================================================== 2. PD and MR */
static void t_mr_rules(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	CHECK(pd && pd->context == ctx);
	long page = sysconf(_SC_PAGESIZE);
	uint8_t *buf = xmap(16 * (size_t)page);
	NULL_ERRNO(ibv_reg_mr(pd, buf, 4096, IBV_ACCESS_REMOTE_WRITE), EINVAL);
	NULL_ERRNO(ibv_reg_mr(pd, buf, 4096, IBV_ACCESS_REMOTE_ATOMIC), EINVAL);
	NULL_ERRNO(ibv_reg_mr(pd, buf, 4096, IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ),
		   EINVAL);
	NULL_ERRNO(ibv_reg_mr(pd, buf, 4096, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_ON_DEMAND),
		   EOPNOTSUPP);
	NULL_ERRNO(ibv_reg_mr(pd, buf, 0, IBV_ACCESS_LOCAL_WRITE), EINVAL);
	/* an unmapped hole in the range */
	CHECK(munmap(buf + 4 * page, (size_t)page) == 0);
	NULL_ERRNO(ibv_reg_mr(pd, buf, 8 * (size_t)page, 0), EFAULT);
	NULL_ERRNO(ibv_reg_mr(pd, buf + 4 * page + 10, 10, IBV_ACCESS_LOCAL_WRITE), EFAULT);
	struct ibv_mr *m = ibv_reg_mr(pd, buf, 4 * (size_t)page, IBV_ACCESS_LOCAL_WRITE);
	CHECKM(m, "registering the mapped part: %s", strerror(errno));
	EQ_ERR(ibv_dereg_mr(m), 0);
	/* a read-only mapping: fine without write rights, EFAULT with them */
	uint8_t *ro = mmap(NULL, 2 * (size_t)page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(ro != MAP_FAILED);
	NULL_ERRNO(ibv_reg_mr(pd, ro, (size_t)page, IBV_ACCESS_LOCAL_WRITE), EFAULT);
	NULL_ERRNO(ibv_reg_mr(pd, ro, (size_t)page,
			      IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE),
		   EFAULT);
	struct ibv_mr *r1 = ibv_reg_mr(pd, ro, (size_t)page, 0);
	CHECKM(r1, "read-only memory without write rights: %s", strerror(errno));
	struct ibv_mr *r2 = ibv_reg_mr(pd, ro, 2 * (size_t)page, IBV_ACCESS_REMOTE_READ);
	CHECKM(r2, "read-only memory with REMOTE_READ: %s", strerror(errno));
	/* the MR's fields */
	struct ibv_mr *mr = ibv_reg_mr(pd, buf + 100, 3000, ALL_ACCESS);
	CHECK(mr);
	EQ(mr->lkey, mr->rkey);
	CHECK(mr->addr == buf + 100);
	EQ(mr->length, 3000);
	CHECK(mr->pd == pd && mr->context == ctx);
	CHECK(mr->lkey != r1->lkey && r1->lkey != r2->lkey);
	/* the iova and the address must have the same offset in the page (the kernel's
	 * ib_uverbs_reg_mr rule) */
	NULL_ERRNO(ibv_reg_mr_iova(pd, buf + 1, 100, 0x10000, IBV_ACCESS_LOCAL_WRITE), EINVAL);
	struct ibv_mr *iv = ibv_reg_mr_iova(pd, buf + 1, 100, 0x10001, IBV_ACCESS_LOCAL_WRITE);
	CHECKM(iv, "ibv_reg_mr_iova with a matching page offset: %s", strerror(errno));
	EQ_ERR(ibv_dereg_mr(iv), 0);
	EQ_ERR(ibv_dereg_mr(mr), 0);
	EQ_ERR(ibv_dereg_mr(r1), 0);
	EQ_ERR(ibv_dereg_mr(r2), 0);
	EQ_ERR(ibv_dealloc_pd(pd), 0);
	ibv_close_device(ctx);
}

/* RLIMIT_MEMLOCK is charged with pinned pages unless CAP_IPC_LOCK, per process: a child
 * starts with nothing pinned even when its parent has registrations. */
static void memlock_peer(int fd, const void *arg)
{
	(void)arg;
	long page = sysconf(_SC_PAGESIZE);
	drop_ipc_lock();
	struct rlimit rl = {(rlim_t)(16 * page), (rlim_t)(16 * page)};
	CHECK(setrlimit(RLIMIT_MEMLOCK, &rl) == 0);
	struct ibv_context *ctx = open_dev("soft0");
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	CHECK(pd);
	uint8_t *buf = xmap(32 * (size_t)page);
	struct ibv_mr *m1 = ibv_reg_mr(pd, buf, 16 * (size_t)page, IBV_ACCESS_LOCAL_WRITE);
	CHECKM(m1, "16 pages with a 16-page limit (nothing pinned yet in this process): %s",
	       strerror(errno));
	NULL_ERRNO(ibv_reg_mr(pd, buf + 16 * page, (size_t)page, IBV_ACCESS_LOCAL_WRITE), ENOMEM);
	NULL_ERRNO(ibv_reg_mr(pd, buf, 1, 0), ENOMEM);
	EQ_ERR(ibv_dereg_mr(m1), 0); /* gives the pages back */
	struct ibv_mr *m2 = ibv_reg_mr(pd, buf + 16 * page, (size_t)page, IBV_ACCESS_LOCAL_WRITE);
	CHECKM(m2, "after deregistration: %s", strerror(errno));
	struct ibv_mr *m3 = ibv_reg_mr(pd, buf, 14 * (size_t)page, IBV_ACCESS_LOCAL_WRITE);
	CHECKM(m3, "15 of 16 pages: %s", strerror(errno));
	/* two bytes straddling a page boundary pin two pages */
	NULL_ERRNO(ibv_reg_mr(pd, buf + page - 1, 2, IBV_ACCESS_LOCAL_WRITE), ENOMEM);
	struct ibv_mr *m4 = ibv_reg_mr(pd, buf + page - 1, 1, IBV_ACCESS_LOCAL_WRITE);
	CHECKM(m4, "the 16th page: %s", strerror(errno));
	NULL_ERRNO(ibv_reg_mr(pd, buf, 1, IBV_ACCESS_LOCAL_WRITE), ENOMEM);
	EQ_ERR(ibv_dereg_mr(m2), 0);
	EQ_ERR(ibv_dereg_mr(m3), 0);
	EQ_ERR(ibv_dereg_mr(m4), 0);
	struct ibv_mr *m5 = ibv_reg_mr(pd, buf, 16 * (size_t)page, IBV_ACCESS_LOCAL_WRITE);
	CHECKM(m5, "everything deregistered, 16 pages again: %s", strerror(errno));
	ibv_dereg_mr(m5);
	ibv_dealloc_pd(pd);
	ibv_close_device(ctx);
	msg_send_u32(fd, 1);
}

static void t_mr_memlock(const void *arg)
{
	(void)arg;
	/* The parent has 1 MiB pinned when it forks; the child must not be charged. */
	struct ibv_context *ctx = open_dev("soft0");
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	uint8_t *buf = xmap(MiB);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, MiB, IBV_ACCESS_LOCAL_WRITE);
	CHECK(mr);
	struct peer p = spawn_peer(memlock_peer, NULL);
	EQ(msg_recv_u32(p.fd, 10000), 1);
	EQ(peer_wait(&p, 5000), 0);
	ibv_dereg_mr(mr);
	ibv_dealloc_pd(pd);
	ibv_close_device(ctx);
}

/* ================================================================== 3. destruction order */
static void t_destroy_order(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *cq = ibv_create_cq(ctx, 16, NULL, NULL, 0);
	CHECK(pd && cq);
	uint8_t *buf = xmap(4096);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, 4096, IBV_ACCESS_LOCAL_WRITE);
	CHECK(mr);
	struct qpcfg qc = qcfg();
	struct ibv_qp *qp = mk_qp(pd, cq, cq, &qc);
	EQ_ERR(ibv_dealloc_pd(pd), EBUSY);
	EQ_ERR(ibv_dereg_mr(mr), 0);
	EQ_ERR(ibv_dealloc_pd(pd), EBUSY); /* the QP still uses it */
	EQ_ERR(ibv_destroy_cq(cq), EBUSY);
	EQ_ERR(ibv_destroy_qp(qp), 0);
	EQ_ERR(ibv_destroy_cq(cq), 0);
	EQ_ERR(ibv_dealloc_pd(pd), 0);
	/* channels count their CQs in refcnt */
	struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
	CHECK(ch && ch->context == ctx && ch->fd >= 0);
	EQ(ch->refcnt, 0);
	struct ibv_cq *c1 = ibv_create_cq(ctx, 4, NULL, ch, 0);
	CHECK(c1 && c1->channel == ch);
	EQ(ch->refcnt, 1);
	struct ibv_cq *c2 = ibv_create_cq(ctx, 4, NULL, ch, 1);
	CHECK(c2);
	EQ(ch->refcnt, 2);
	EQ_ERR(ibv_destroy_comp_channel(ch), EBUSY);
	EQ_ERR(ibv_destroy_cq(c1), 0);
	EQ(ch->refcnt, 1);
	EQ_ERR(ibv_destroy_comp_channel(ch), EBUSY);
	EQ_ERR(ibv_destroy_cq(c2), 0);
	EQ(ch->refcnt, 0);
	EQ_ERR(ibv_destroy_comp_channel(ch), 0);
	EQ_ERR(ibv_close_device(ctx), 0);
}

/* ibv_close_device destroys what is left, as closing the device file does; the device
 * works afterwards. */
static void t_close_leftovers(const void *arg)
{
	struct ibv_comp_channel *ch;
	struct pair p;
	{
		struct ibv_context *ctx = open_dev(arg);
		ch = ibv_create_comp_channel(ctx);
		CHECK(ch);
		struct pcfg c = pc(64 * KiB);
		c.ch_b = ch;
		struct qpo o = dflt();
		pair_init2(&p, ctx, NULL, &c, &o, &o);
	}
	CHECK(ibv_req_notify_cq(p.b.rcq, 0) == 0);
	RECV(p.b.qp, 1, p.b.buf, 100, p.b.mr->lkey);
	RECV(p.b.qp, 2, p.b.buf, 100, p.b.mr->lkey); /* stays posted */
	POST(p.a.qp, IBV_WR_SEND, 7, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 7, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p.b.rcq, 1, IBV_WC_SUCCESS, 5000);
	CHECK(fd_readable(ch->fd, 2000)); /* an unread completion event */
	/* an unsignaled WRITE in flight */
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 8, p.a.buf, 4096, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, 0, 0);
	double t0 = now_ms();
	EQ_ERR(ibv_close_device(p.ctx), 0);
	CHECKM(now_ms() - t0 < 2000, "ibv_close_device took %.0f ms", now_ms() - t0);
	/* again, from scratch */
	pair_init(&p, arg, 64 * KiB);
	fill(p.a.buf, 5000, 3);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 9, p.a.buf, 5000, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 9, IBV_WC_SUCCESS, 5000);
	CHECK_FILL(p.b.buf, 5000, 3);
	EQ_ERR(ibv_close_device(p.ctx), 0);
}

/* ================================================================== 4. CQs and channels */
static void t_cq_bounds(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	NULL_ERRNO(ibv_create_cq(ctx, 0, NULL, NULL, 0), EINVAL);
	NULL_ERRNO(ibv_create_cq(ctx, -1, NULL, NULL, 0), EINVAL);
	NULL_ERRNO(ibv_create_cq(ctx, 65536, NULL, NULL, 0), EINVAL);
	CHECK(ctx->num_comp_vectors >= 1);
	NULL_ERRNO(ibv_create_cq(ctx, 8, NULL, NULL, ctx->num_comp_vectors), EINVAL);
	NULL_ERRNO(ibv_create_cq(ctx, 8, NULL, NULL, -1), EINVAL);
	int token;
	struct ibv_cq *cq = ibv_create_cq(ctx, 65535, &token, NULL, ctx->num_comp_vectors - 1);
	CHECKM(cq, "max_cqe entries, last vector: %s", strerror(errno));
	CHECK(cq->cqe >= 65535);
	CHECK(cq->context == ctx && cq->cq_context == &token && cq->channel == NULL);
	EQ_ERR(ibv_destroy_cq(cq), 0);
	cq = ibv_create_cq(ctx, 1, NULL, NULL, 0);
	CHECK(cq && cq->cqe >= 1);
	struct ibv_wc wc[4];
	EQ(ibv_poll_cq(cq, 4, wc), 0);
	EQ_ERR(ibv_destroy_cq(cq), 0);
	ibv_close_device(ctx);
}

/* One event per arming, only for completions after arming; the fd is pollable;
 * ibv_destroy_cq does not wait once every event is acknowledged. */
static void t_cq_events(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
	CHECK(ch);
	struct pcfg c = pc(64 * KiB);
	c.ch_b = ch;
	struct qpo o = dflt();
	struct pair p;
	pair_init2(&p, ctx, NULL, &c, &o, &o);
	CHECK(!fd_readable(ch->fd, 0));
	/* a completion before arming raises nothing, even once armed */
	RECV(p.b.qp, 1, p.b.buf, 100, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.b.rcq, 1, IBV_WC_SUCCESS, 5000);
	RECV(p.b.qp, 2, p.b.buf, 100, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 2, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 5000);
	nap_us(20000); /* B's completion 2 is in its CQ, unpolled */
	EQ_ERR(ibv_req_notify_cq(p.b.rcq, 0), 0);
	CHECKM(!fd_readable(ch->fd, 50), "an event for a completion that came before arming");
	EXPECT_WC(p.b.rcq, 2, IBV_WC_SUCCESS, 1000);
	/* two completions after arming: one event */
	RECV(p.b.qp, 3, p.b.buf, 100, p.b.mr->lkey);
	RECV(p.b.qp, 4, p.b.buf, 100, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 3, p.a.buf, 10, p.a.mr->lkey, 0, 0, 0, 0);
	POST(p.a.qp, IBV_WR_SEND, 4, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 4, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p.b.rcq, 3, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p.b.rcq, 4, IBV_WC_SUCCESS, 5000);
	CHECK(fd_readable(ch->fd, 1000));
	struct ibv_cq *ecq = NULL;
	void *ectx = NULL;
	EQ(ibv_get_cq_event(ch, &ecq, &ectx), 0);
	CHECK(ecq == p.b.rcq);
	CHECK(ectx == &p.b);
	CHECKM(!fd_readable(ch->fd, 50), "a second event from one arming");
	/* re-armed: the next completion raises one more */
	EQ_ERR(ibv_req_notify_cq(p.b.rcq, 0), 0);
	RECV(p.b.qp, 5, p.b.buf, 100, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 5, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	CHECK(fd_readable(ch->fd, 5000));
	EQ(ibv_get_cq_event(ch, &ecq, &ectx), 0);
	CHECK(ecq == p.b.rcq);
	ibv_ack_cq_events(p.b.rcq, 2);
	EXPECT_WC(p.a.scq, 5, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p.b.rcq, 5, IBV_WC_SUCCESS, 5000);
	/* every event acknowledged: destroying does not wait */
	EQ_ERR(ibv_destroy_qp(p.b.qp), 0);
	double t0 = now_ms();
	EQ_ERR(ibv_destroy_cq(p.b.rcq), 0);
	CHECKM(now_ms() - t0 < 300, "ibv_destroy_cq waited %.0f ms with every event acked",
	       now_ms() - t0);
	EQ(ch->refcnt, 0);
	EQ_ERR(ibv_destroy_comp_channel(ch), 0);
	ibv_close_device(ctx);
}

static void t_cq_solicited(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
	struct pcfg c = pc(64 * KiB);
	c.ch_b = ch;
	struct qpo o = dflt();
	struct pair p;
	pair_init2(&p, ctx, NULL, &c, &o, &o);
	EQ_ERR(ibv_req_notify_cq(p.b.rcq, 1), 0);
	RECV(p.b.qp, 1, p.b.buf, 100, p.b.mr->lkey);
	RECV(p.b.qp, 2, p.b.buf, 100, p.b.mr->lkey);
	RECV(p.b.qp, 3, p.b.buf, 100, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.b.rcq, 1, IBV_WC_SUCCESS, 5000);
	CHECKM(!fd_readable(ch->fd, 50), "an unsolicited SEND raised a solicited-only event");
	POST(p.a.qp, IBV_WR_SEND_WITH_IMM, 2, p.a.buf, 10, p.a.mr->lkey, 0, 0,
	     IBV_SEND_SIGNALED | IBV_SEND_SOLICITED, htonl(5));
	CHECKM(fd_readable(ch->fd, 5000), "no event for a solicited SEND");
	struct ibv_cq *ecq;
	void *ectx;
	EQ(ibv_get_cq_event(ch, &ecq, &ectx), 0);
	CHECK(ecq == p.b.rcq);
	ibv_ack_cq_events(ecq, 1);
	struct ibv_wc wc = EXPECT_WC(p.b.rcq, 2, IBV_WC_SUCCESS, 5000);
	EQ(wc.imm_data, htonl(5));
	/* arming for all completions after a solicited-only arming widens it */
	EQ_ERR(ibv_req_notify_cq(p.b.rcq, 1), 0);
	EQ_ERR(ibv_req_notify_cq(p.b.rcq, 0), 0);
	POST(p.a.qp, IBV_WR_SEND, 3, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	CHECK(fd_readable(ch->fd, 5000));
	EQ(ibv_get_cq_event(ch, &ecq, &ectx), 0);
	ibv_ack_cq_events(ecq, 1);
	ibv_close_device(ctx);
}

/* Events of a destroyed CQ are not returned later; others on the channel are. */
static void t_cq_destroyed_events(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
	struct pcfg c = pc(64 * KiB);
	c.ch_b = ch;
	struct qpo o = dflt();
	struct pair p1, p2;
	pair_init2(&p1, ctx, NULL, &c, &o, &o);
	pair_init2(&p2, ctx, NULL, &c, &o, &o);
	EQ_ERR(ibv_req_notify_cq(p1.b.rcq, 0), 0);
	EQ_ERR(ibv_req_notify_cq(p2.b.rcq, 0), 0);
	RECV(p1.b.qp, 1, p1.b.buf, 100, p1.b.mr->lkey);
	RECV(p2.b.qp, 2, p2.b.buf, 100, p2.b.mr->lkey);
	POST(p1.a.qp, IBV_WR_SEND, 1, p1.a.buf, 10, p1.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p1.a.scq, 1, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p1.b.rcq, 1, IBV_WC_SUCCESS, 5000);
	POST(p2.a.qp, IBV_WR_SEND, 2, p2.a.buf, 10, p2.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p2.a.scq, 2, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p2.b.rcq, 2, IBV_WC_SUCCESS, 5000);
	nap_us(10000);
	CHECK(fd_readable(ch->fd, 0)); /* two events queued, none read */
	EQ_ERR(ibv_destroy_qp(p1.b.qp), 0);
	double t0 = now_ms();
	EQ_ERR(ibv_destroy_cq(p1.b.rcq), 0); /* no event handed out: no wait */
	CHECK(now_ms() - t0 < 300);
	struct ibv_cq *ecq;
	void *ectx;
	CHECK(fd_readable(ch->fd, 0));
	EQ(ibv_get_cq_event(ch, &ecq, &ectx), 0);
	CHECKM(ecq == p2.b.rcq, "got an event of %s CQ", ecq == p1.b.rcq ? "the destroyed" : "an unknown");
	ibv_ack_cq_events(ecq, 1);
	CHECKM(!fd_readable(ch->fd, 50), "the destroyed CQ's event is still on the channel");
	EQ_ERR(ibv_destroy_qp(p2.b.qp), 0);
	EQ_ERR(ibv_destroy_cq(p2.b.rcq), 0);
	EQ_ERR(ibv_destroy_comp_channel(ch), 0);
	ibv_close_device(ctx);
}

/* ================================================================== 5. QP state machine */
static void t_qp_create(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *cq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
	struct ibv_qp_init_attr a;
	memset(&a, 0, sizeof a);
	a.send_cq = a.recv_cq = cq;
	a.qp_type = IBV_QPT_RC;
	a.cap.max_send_wr = a.cap.max_recv_wr = 16;
	a.cap.max_send_sge = a.cap.max_recv_sge = 1;
	struct ibv_qp_init_attr b = a;
	b.cap.max_send_wr = 16385;
	NULL_ERRNO(ibv_create_qp(pd, &b), EINVAL);
	b = a;
	b.cap.max_recv_wr = 16385;
	NULL_ERRNO(ibv_create_qp(pd, &b), EINVAL);
	b = a;
	b.cap.max_send_sge = 17;
	NULL_ERRNO(ibv_create_qp(pd, &b), EINVAL);
	b = a;
	b.cap.max_inline_data = 257;
	NULL_ERRNO(ibv_create_qp(pd, &b), EINVAL);
	b = a;
	b.qp_type = IBV_QPT_UD;
	NULL_ERRNO(ibv_create_qp(pd, &b), EOPNOTSUPP);
	b = a;
	b.qp_type = IBV_QPT_UC;
	NULL_ERRNO(ibv_create_qp(pd, &b), EOPNOTSUPP);
	b = a;
	b.send_cq = NULL;
	NULL_ERRNO(ibv_create_qp(pd, &b), EINVAL);
	b = a;
	b.cap.max_inline_data = 256;
	b.cap.max_send_wr = 16384;
	b.cap.max_send_sge = 16;
	int token;
	b.qp_context = &token;
	struct ibv_qp *q1 = ibv_create_qp(pd, &b);
	CHECKM(q1, "the device's limits exactly: %s", strerror(errno));
	struct ibv_qp *q2 = ibv_create_qp(pd, &a);
	CHECK(q2);
	EQ(q1->state, IBV_QPS_RESET);
	EQ(q1->qp_type, IBV_QPT_RC);
	CHECK(q1->pd == pd && q1->send_cq == cq && q1->recv_cq == cq && q1->context == ctx);
	CHECK(q1->qp_context == &token);
	CHECK(q1->qp_num != 0 && q1->qp_num <= 0xffffff);
	CHECK(q1->qp_num != q2->qp_num);
	EQ(query_state(q1), IBV_QPS_RESET);
	CHECK(ibv_qp_to_qp_ex(q1) == NULL);
	EQ_ERR(ibv_destroy_qp(q1), 0);
	EQ_ERR(ibv_destroy_qp(q2), 0);
	ibv_close_device(ctx);
}

struct sm { /* a QP and a (never used) remote endpoint for state machine tests */
	struct ibv_context *ctx;
	struct ibv_pd *pd;
	struct ibv_cq *cq;
	struct ibv_qp *peer;
	struct ep rep;
	int eth;
};

static void sm_init(struct sm *s, const char *dev)
{
	s->ctx = open_dev(dev);
	s->eth = ctx_is_eth(s->ctx);
	s->pd = ibv_alloc_pd(s->ctx);
	s->cq = ibv_create_cq(s->ctx, 256, NULL, NULL, 0);
	struct qpcfg c = qcfg();
	s->peer = mk_qp(s->pd, s->cq, s->cq, &c);
	s->rep = mk_ep(s->ctx, s->peer, 0x300, 1);
}

static struct ibv_qp *sm_qp(struct sm *s)
{
	struct qpcfg c = qcfg();
	return mk_qp(s->pd, s->cq, s->cq, &c);
}

/* Valid values for every attribute. */
static void full_attr(struct sm *s, struct ibv_qp_attr *a, enum ibv_qp_state cur,
		      enum ibv_qp_state next)
{
	memset(a, 0, sizeof *a);
	a->qp_state = next;
	a->cur_qp_state = cur;
	a->path_mtu = IBV_MTU_1024;
	a->path_mig_state = IBV_MIG_MIGRATED;
	a->rq_psn = 0x100;
	a->sq_psn = 0x200;
	a->dest_qp_num = s->rep.qpn;
	a->qp_access_flags = ALL_ACCESS;
	fill_av(&a->ah_attr, &s->rep, 1);
	a->alt_ah_attr = a->ah_attr;
	a->alt_port_num = 1;
	a->alt_timeout = 14;
	a->max_rd_atomic = 1;
	a->max_dest_rd_atomic = 1;
	a->min_rnr_timer = 12;
	a->port_num = 1;
	a->timeout = 14;
	a->retry_cnt = 7;
	a->rnr_retry = 7;
}

#define REQ_RST_INIT (IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)
#define REQ_INIT_RTR                                                                      \
	(IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |                  \
	 IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER)
#define REQ_RTR_RTS                                                                       \
	(IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |           \
	 IBV_QP_MAX_QP_RD_ATOMIC)

static void sm_drive(struct sm *s, struct ibv_qp *qp, enum ibv_qp_state to)
{
	struct ibv_qp_attr a;
	static const enum ibv_qp_state path[] = {IBV_QPS_INIT, IBV_QPS_RTR, IBV_QPS_RTS,
						 IBV_QPS_SQD};
	static const int masks[] = {REQ_RST_INIT, REQ_INIT_RTR, REQ_RTR_RTS, 0};
	if (to == IBV_QPS_RESET)
		return;
	if (to == IBV_QPS_ERR) {
		full_attr(s, &a, IBV_QPS_RESET, IBV_QPS_INIT);
		EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | REQ_RST_INIT), 0);
		EQ_ERR(to_state(qp, IBV_QPS_ERR), 0);
		return;
	}
	for (int i = 0; i < 4; i++) {
		enum ibv_qp_state cur = i ? path[i - 1] : IBV_QPS_RESET;
		full_attr(s, &a, cur, path[i]);
		EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | masks[i]), 0);
		if (path[i] == to)
			break;
	}
	EQ(qp->state, to);
}

static const int all_bits[] = {
	IBV_QP_CUR_STATE,  IBV_QP_EN_SQD_ASYNC_NOTIFY, IBV_QP_ACCESS_FLAGS, IBV_QP_PKEY_INDEX,
	IBV_QP_PORT,	   IBV_QP_QKEY,		       IBV_QP_AV,	    IBV_QP_PATH_MTU,
	IBV_QP_TIMEOUT,	   IBV_QP_RETRY_CNT,	       IBV_QP_RNR_RETRY,    IBV_QP_RQ_PSN,
	IBV_QP_MAX_QP_RD_ATOMIC, IBV_QP_ALT_PATH,      IBV_QP_MIN_RNR_TIMER, IBV_QP_SQ_PSN,
	IBV_QP_MAX_DEST_RD_ATOMIC, IBV_QP_PATH_MIG_STATE, IBV_QP_CAP,	    IBV_QP_DEST_QPN,
	IBV_QP_RATE_LIMIT,
};
#define NBITS ((int)(sizeof all_bits / sizeof all_bits[0]))

/* Every RC transition of the kernel's qp_state_table: each required attribute is
 * required, each attribute outside required+optional is refused, and a refused modify
 * changes nothing. */
static void t_qp_masks(const void *arg)
{
	static const struct {
		enum ibv_qp_state from, to;
		int req, opt;
	} tbl[] = {
		{IBV_QPS_RESET, IBV_QPS_INIT, REQ_RST_INIT, 0},
		{IBV_QPS_INIT, IBV_QPS_INIT, 0, REQ_RST_INIT},
		{IBV_QPS_INIT, IBV_QPS_RTR, REQ_INIT_RTR,
		 IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX},
		{IBV_QPS_RTR, IBV_QPS_RTS, REQ_RTR_RTS,
		 IBV_QP_CUR_STATE | IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER |
			 IBV_QP_PATH_MIG_STATE},
		{IBV_QPS_RTS, IBV_QPS_RTS, 0,
		 IBV_QP_CUR_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_ALT_PATH | IBV_QP_PATH_MIG_STATE |
			 IBV_QP_MIN_RNR_TIMER},
		{IBV_QPS_RTS, IBV_QPS_SQD, 0, IBV_QP_EN_SQD_ASYNC_NOTIFY},
		{IBV_QPS_SQD, IBV_QPS_SQD, 0,
		 IBV_QP_PORT | IBV_QP_AV | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
			 IBV_QP_MAX_QP_RD_ATOMIC | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_ALT_PATH |
			 IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX | IBV_QP_MIN_RNR_TIMER |
			 IBV_QP_PATH_MIG_STATE},
		{IBV_QPS_SQD, IBV_QPS_RTS, 0,
		 IBV_QP_CUR_STATE | IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER |
			 IBV_QP_PATH_MIG_STATE},
	};
	struct sm s;
	sm_init(&s, arg);
	struct ibv_qp_attr a;
	for (size_t t = 0; t < sizeof tbl / sizeof tbl[0]; t++) {
		struct ibv_qp *qp = sm_qp(&s);
		sm_drive(&s, qp, tbl[t].from);
		for (int i = 0; i < NBITS; i++) {
			int bit = all_bits[i];
			int mask;
			if (tbl[t].req & bit)
				mask = IBV_QP_STATE | (tbl[t].req & ~bit);
			else if (!(tbl[t].opt & bit))
				mask = IBV_QP_STATE | tbl[t].req | bit;
			else
				continue;
			full_attr(&s, &a, tbl[t].from, tbl[t].to);
			int rc = ibv_modify_qp(qp, &a, mask);
			CHECKM(rc == EINVAL,
			       "transition %d -> %d with attribute bit %#x %s: got %d, expected EINVAL",
			       tbl[t].from, tbl[t].to, bit,
			       (tbl[t].req & bit) ? "missing" : "not allowed", rc);
			EQ(qp->state, tbl[t].from);
			EQ(query_state(qp), tbl[t].from);
		}
		full_attr(&s, &a, tbl[t].from, tbl[t].to);
		int mask = IBV_QP_STATE | tbl[t].req | (tbl[t].opt & ~IBV_QP_ALT_PATH);
		int rc = ibv_modify_qp(qp, &a, mask);
		CHECKM(rc == 0, "transition %d -> %d with mask %#x: %s", tbl[t].from, tbl[t].to, mask,
		       strerror(rc));
		EQ(qp->state, tbl[t].to);
		EQ(query_state(qp), tbl[t].to);
		EQ_ERR(ibv_destroy_qp(qp), 0);
	}
	/* to ERR and to RESET from every state, with no attributes allowed; RESET -> ERR
	 * is not in the kernel's table */
	static const enum ibv_qp_state from[] = {IBV_QPS_INIT, IBV_QPS_RTR, IBV_QPS_RTS,
						 IBV_QPS_SQD, IBV_QPS_ERR};
	for (size_t i = 0; i < sizeof from / sizeof from[0]; i++) {
		struct ibv_qp *qp = sm_qp(&s);
		sm_drive(&s, qp, from[i]);
		full_attr(&s, &a, from[i], IBV_QPS_ERR);
		EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PORT), EINVAL);
		EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE), 0);
		EQ(qp->state, IBV_QPS_ERR);
		EQ(query_state(qp), IBV_QPS_ERR);
		a.qp_state = IBV_QPS_RESET;
		EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_ACCESS_FLAGS), EINVAL);
		EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE), 0);
		EQ(qp->state, IBV_QPS_RESET);
		EQ(query_state(qp), IBV_QPS_RESET);
		EQ_ERR(ibv_destroy_qp(qp), 0);
	}
	struct ibv_qp *qp = sm_qp(&s);
	EQ_ERR(to_state(qp, IBV_QPS_RESET), 0);
	EQ_ERR(to_state(qp, IBV_QPS_ERR), EINVAL);
	EQ(qp->state, IBV_QPS_RESET);
	EQ(query_state(qp), IBV_QPS_RESET);
	ibv_close_device(s.ctx);
}

static void t_qp_bad_transitions(const void *arg)
{
	static const struct {
		enum ibv_qp_state from, to;
		int mask;
	} bad[] = {
		{IBV_QPS_RESET, IBV_QPS_RTR, REQ_INIT_RTR}, {IBV_QPS_RESET, IBV_QPS_RTS, REQ_RTR_RTS},
		{IBV_QPS_RESET, IBV_QPS_SQD, 0},	   {IBV_QPS_RESET, IBV_QPS_ERR, 0},
		{IBV_QPS_INIT, IBV_QPS_RTS, REQ_RTR_RTS},  {IBV_QPS_INIT, IBV_QPS_SQD, 0},
		{IBV_QPS_RTR, IBV_QPS_RTR, 0},		   {IBV_QPS_RTR, IBV_QPS_INIT, 0},
		{IBV_QPS_RTR, IBV_QPS_SQD, 0},		   {IBV_QPS_RTS, IBV_QPS_INIT, 0},
		{IBV_QPS_RTS, IBV_QPS_RTR, REQ_INIT_RTR},  {IBV_QPS_SQD, IBV_QPS_INIT, 0},
		{IBV_QPS_SQD, IBV_QPS_RTR, REQ_INIT_RTR},  {IBV_QPS_ERR, IBV_QPS_INIT, REQ_RST_INIT},
		{IBV_QPS_ERR, IBV_QPS_RTR, REQ_INIT_RTR},  {IBV_QPS_ERR, IBV_QPS_RTS, REQ_RTR_RTS},
		{IBV_QPS_ERR, IBV_QPS_SQD, 0},
	};
	struct sm s;
	sm_init(&s, arg);
	struct ibv_qp_attr a;
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		struct ibv_qp *qp = sm_qp(&s);
		sm_drive(&s, qp, bad[i].from);
		full_attr(&s, &a, bad[i].from, bad[i].to);
		int rc = ibv_modify_qp(qp, &a, IBV_QP_STATE | bad[i].mask);
		CHECKM(rc == EINVAL, "transition %d -> %d: got %d, expected EINVAL", bad[i].from,
		       bad[i].to, rc);
		EQ(qp->state, bad[i].from);
		EQ(query_state(qp), bad[i].from);
		EQ_ERR(ibv_destroy_qp(qp), 0);
	}
	struct ibv_qp *qp = sm_qp(&s);
	full_attr(&s, &a, IBV_QPS_RESET, IBV_QPS_INIT);
	a.qp_state = (enum ibv_qp_state)7;
	EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | REQ_RST_INIT), EINVAL);
	/* IBV_QP_CUR_STATE is only allowed from RTR, RTS, SQD, SQE */
	sm_drive(&s, qp, IBV_QPS_INIT);
	full_attr(&s, &a, IBV_QPS_INIT, IBV_QPS_INIT);
	EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_CUR_STATE), EINVAL);
	EQ(qp->state, IBV_QPS_INIT);
	ibv_close_device(s.ctx);
}

/* Attribute ranges (EINVAL, nothing changes), and the edge values that are allowed. */
static void t_qp_ranges(const void *arg)
{
	struct sm s;
	sm_init(&s, arg);
	struct ibv_qp *qp = sm_qp(&s);
	struct ibv_qp_attr a;
#define BAD(from, to, mask, field, value)                                                 \
	do {                                                                              \
		full_attr(&s, &a, from, to);                                              \
		a.field = value;                                                          \
		int _rc = ibv_modify_qp(qp, &a, IBV_QP_STATE | (mask));                   \
		CHECKM(_rc == EINVAL, "%s = %lld: got %d, expected EINVAL", #field,       \
		       (long long)(value), _rc);                                          \
		EQ(qp->state, from);                                                      \
	} while (0)
	BAD(IBV_QPS_RESET, IBV_QPS_INIT, REQ_RST_INIT, port_num, 2);
	BAD(IBV_QPS_RESET, IBV_QPS_INIT, REQ_RST_INIT, port_num, 0);
	BAD(IBV_QPS_RESET, IBV_QPS_INIT, REQ_RST_INIT, pkey_index, 1);
	sm_drive(&s, qp, IBV_QPS_INIT);
	BAD(IBV_QPS_INIT, IBV_QPS_RTR, REQ_INIT_RTR, path_mtu, (enum ibv_mtu)(IBV_MTU_4096 + 1));
	BAD(IBV_QPS_INIT, IBV_QPS_RTR, REQ_INIT_RTR, path_mtu, (enum ibv_mtu)0);
	BAD(IBV_QPS_INIT, IBV_QPS_RTR, REQ_INIT_RTR, min_rnr_timer, 32);
	BAD(IBV_QPS_INIT, IBV_QPS_RTR, REQ_INIT_RTR, max_dest_rd_atomic, 17);
	BAD(IBV_QPS_INIT, IBV_QPS_RTR, REQ_INIT_RTR, ah_attr.port_num, 0);
	BAD(IBV_QPS_INIT, IBV_QPS_RTR, REQ_INIT_RTR, ah_attr.port_num, 2);
	/* a GRH whose sgid_index is beyond the table, or an empty entry */
	full_attr(&s, &a, IBV_QPS_INIT, IBV_QPS_RTR);
	a.ah_attr.is_global = 1;
	a.ah_attr.grh.dgid = s.rep.gid;
	a.ah_attr.grh.sgid_index = 16;
	EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | REQ_INIT_RTR), EINVAL);
	a.ah_attr.grh.sgid_index = s.eth ? 4 : 1;
	EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | REQ_INIT_RTR), EINVAL);
	EQ(qp->state, IBV_QPS_INIT);
	if (s.eth) {
		full_attr(&s, &a, IBV_QPS_INIT, IBV_QPS_RTR);
		a.ah_attr.is_global = 0;
		EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | REQ_INIT_RTR), EINVAL);
	}
	/* edge values that are fine: MTU 4096, min_rnr_timer 31, 16 READs */
	full_attr(&s, &a, IBV_QPS_INIT, IBV_QPS_RTR);
	a.path_mtu = IBV_MTU_4096;
	a.min_rnr_timer = 31;
	a.max_dest_rd_atomic = 16;
	EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | REQ_INIT_RTR), 0);
	EQ(qp->state, IBV_QPS_RTR);
	BAD(IBV_QPS_RTR, IBV_QPS_RTS, REQ_RTR_RTS, timeout, 32);
	BAD(IBV_QPS_RTR, IBV_QPS_RTS, REQ_RTR_RTS, retry_cnt, 8);
	BAD(IBV_QPS_RTR, IBV_QPS_RTS, REQ_RTR_RTS, rnr_retry, 8);
	BAD(IBV_QPS_RTR, IBV_QPS_RTS, REQ_RTR_RTS, max_rd_atomic, 17);
	full_attr(&s, &a, IBV_QPS_RTR, IBV_QPS_RTS);
	a.timeout = 31;
	a.retry_cnt = 7;
	a.rnr_retry = 7;
	a.max_rd_atomic = 16;
	EQ_ERR(ibv_modify_qp(qp, &a, IBV_QP_STATE | REQ_RTR_RTS), 0);
	EQ(qp->state, IBV_QPS_RTS);
#undef BAD
	ibv_close_device(s.ctx);
}

/* ibv_query_qp returns what was set; with IBV_QP_STATE in the mask it refreshes
 * ibv_qp::state as the real library does. */
static void t_qp_query(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(4096);
	c.q.send_wr = 33;
	c.q.recv_wr = 17;
	c.q.send_sge = 3;
	c.q.recv_sge = 2;
	c.q.inline_data = 64;
	c.q.sig_all = 1;
	c.connect = 0;
	struct qpo o = dflt();
	o.timeout = 17;
	o.retry_cnt = 5;
	o.rnr_retry = 3;
	o.min_rnr_timer = 9;
	o.max_rd_atomic = 4;
	o.max_dest_rd_atomic = 6;
	o.access = IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
	pair_init2(&p, NULL, arg, &c, &o, &o);
	struct ibv_qp *qp = p.a.qp;
	struct ibv_qp_attr a;
	struct ibv_qp_init_attr ia;
	EQ_ERR(to_init(qp, o.access), 0);
	EQ(qp->state, IBV_QPS_INIT);
	EQ_ERR(ibv_query_qp(qp, &a, IBV_QP_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_PORT, &ia), 0);
	EQ(a.qp_state, IBV_QPS_INIT);
	EQ(a.qp_access_flags, o.access);
	EQ(a.port_num, 1);
	EQ_ERR(to_rtr(qp, &p.b.ep, &o), 0);
	EQ(qp->state, IBV_QPS_RTR);
	EQ_ERR(to_rts(qp, p.a.ep.psn, &o), 0);
	EQ(qp->state, IBV_QPS_RTS);
	memset(&a, 0xee, sizeof a);
	memset(&ia, 0xee, sizeof ia);
	EQ_ERR(ibv_query_qp(qp, &a, IBV_QP_STATE | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
					    IBV_QP_RQ_PSN | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT |
					    IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
					    IBV_QP_MIN_RNR_TIMER | IBV_QP_MAX_QP_RD_ATOMIC |
					    IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_AV | IBV_QP_CAP |
					    IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX | IBV_QP_PORT,
			    &ia),
	       0);
	EQ(a.qp_state, IBV_QPS_RTS);
	EQ(a.path_mtu, o.mtu);
	EQ(a.dest_qp_num, p.b.qp->qp_num);
	EQ(a.rq_psn, p.b.ep.psn);
	EQ(a.sq_psn, p.a.ep.psn);
	EQ(a.timeout, 17);
	EQ(a.retry_cnt, 5);
	EQ(a.rnr_retry, 3);
	EQ(a.min_rnr_timer, 9);
	EQ(a.max_rd_atomic, 4);
	EQ(a.max_dest_rd_atomic, 6);
	EQ(a.qp_access_flags, o.access);
	EQ(a.pkey_index, 0);
	EQ(a.port_num, 1);
	EQ(a.ah_attr.dlid, p.b.ep.lid);
	EQ(a.ah_attr.port_num, 1);
	EQ(a.ah_attr.is_global, p.eth);
	if (p.eth) {
		CHECK(!memcmp(a.ah_attr.grh.dgid.raw, p.b.ep.gid.raw, 16));
		EQ(a.ah_attr.grh.sgid_index, o.gid_index);
	}
	CHECK(a.cap.max_send_wr >= 33 && a.cap.max_recv_wr >= 17);
	CHECK(a.cap.max_send_sge >= 3 && a.cap.max_recv_sge >= 2);
	CHECK(a.cap.max_inline_data >= 64);
	CHECK(ia.send_cq == p.a.scq && ia.recv_cq == p.a.rcq);
	EQ(ia.qp_type, IBV_QPT_RC);
	EQ(ia.sq_sig_all, 1);
	EQ(ia.cap.max_send_wr, a.cap.max_send_wr);
	/* ibv_query_qp with IBV_QP_STATE writes ibv_qp::state */
	qp->state = IBV_QPS_INIT;
	EQ_ERR(ibv_query_qp(qp, &a, IBV_QP_STATE, &ia), 0);
	EQ(qp->state, IBV_QPS_RTS);
	ibv_close_device(p.ctx);
}

/* RTS -> SQD: nothing new starts, IBV_EVENT_SQ_DRAINED once drained (asked for), and
 * back to RTS the posted work goes out. */
static void t_qp_sqd(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	struct ibv_qp_attr a;
	struct ibv_async_event ev;
	/* a long WRITE that has begun transmission is finished first: drained only once it
	 * is acknowledged (a request not started yet waits for RTS, as the IB spec says) */
	struct pair q;
	pair_init(&q, arg, 2 * MiB);
	memset(q.a.buf, 0x2b, 2 * MiB);
	POST(q.a.qp, IBV_WR_RDMA_WRITE, 1, q.a.buf, 2 * MiB, q.a.mr->lkey, (uintptr_t)q.b.buf,
	     q.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	volatile uint8_t *qb = q.b.buf;
	double end = now_ms() + 5000;
	while (qb[64 * KiB] != 0x2b)
		CHECKM(now_ms() < end, "the WRITE did not start arriving");
	memset(&a, 0, sizeof a);
	a.qp_state = IBV_QPS_SQD;
	a.en_sqd_async_notify = 1;
	EQ_ERR(ibv_modify_qp(q.a.qp, &a, IBV_QP_STATE | IBV_QP_EN_SQD_ASYNC_NOTIFY), 0);
	CHECKM(get_async(q.ctx, IBV_EVENT_SQ_DRAINED, &ev, 5000), "no IBV_EVENT_SQ_DRAINED");
	for (size_t i = 0; i < 2 * MiB; i += 4096)
		CHECKM(q.b.buf[i] == 0x2b && q.b.buf[i + 4095] == 0x2b,
		       "SQ_DRAINED before the WRITE in flight landed (byte %zu)", i);
	ibv_ack_async_event(&ev);
	EXPECT_WC(q.a.scq, 1, IBV_WC_SUCCESS, 5000);
	ibv_close_device(q.ctx);
	for (int round = 0; round < 2; round++) {
		memset(&a, 0, sizeof a);
		a.qp_state = IBV_QPS_SQD;
		a.en_sqd_async_notify = 1;
		EQ_ERR(ibv_modify_qp(p.a.qp, &a, IBV_QP_STATE | IBV_QP_EN_SQD_ASYNC_NOTIFY), 0);
		EQ(p.a.qp->state, IBV_QPS_SQD);
		CHECKM(get_async(p.ctx, IBV_EVENT_SQ_DRAINED, &ev, 2000),
		       "no IBV_EVENT_SQ_DRAINED (round %d)", round);
		CHECK(ev.element.qp == p.a.qp);
		ibv_ack_async_event(&ev);
		fill(p.a.buf, 1000, (unsigned)round);
		POST(p.a.qp, IBV_WR_RDMA_WRITE, 10 + (uint64_t)round, p.a.buf, 1000, p.a.mr->lkey,
		     (uintptr_t)p.b.buf, p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
		expect_none(p.a.scq, 30, "a WRITE posted in SQD");
		memset(&a, 0, sizeof a);
		a.qp_state = IBV_QPS_RTS;
		EQ_ERR(ibv_modify_qp(p.a.qp, &a, IBV_QP_STATE), 0);
		EXPECT_WC(p.a.scq, 10 + (uint64_t)round, IBV_WC_SUCCESS, 5000);
		CHECK_FILL(p.b.buf, 1000, (unsigned)round);
	}
	ibv_close_device(p.ctx);
}

/* ================================================================== 6. posting */
static void t_post_state(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(4096);
	c.connect = 0;
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	struct ibv_sge sge = {(uintptr_t)p.a.buf, 8, p.a.mr->lkey};
	struct ibv_send_wr wr, *bad;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = 1;
	wr.opcode = IBV_WR_RDMA_WRITE;
	wr.sg_list = &sge;
	wr.num_sge = 1;
	wr.send_flags = IBV_SEND_SIGNALED;
	wr.wr.rdma.remote_addr = (uintptr_t)p.b.buf;
	wr.wr.rdma.rkey = p.b.mr->rkey;
	struct ibv_recv_wr rwr, *rbad;
	memset(&rwr, 0, sizeof rwr);
	rwr.wr_id = 77;
	rwr.sg_list = &sge;
	rwr.num_sge = 1;
	bad = NULL;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), EINVAL); /* RESET */
	CHECK(bad == &wr);
	rbad = NULL;
	EQ_ERR(ibv_post_recv(p.b.qp, &rwr, &rbad), EINVAL);
	CHECK(rbad == &rwr);
	EQ_ERR(to_init(p.a.qp, o.access), 0);
	EQ_ERR(to_init(p.b.qp, o.access), 0);
	bad = NULL;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), EINVAL); /* INIT */
	CHECK(bad == &wr);
	/* a receive posted in INIT is used once the QP is connected */
	struct ibv_sge rsge = {(uintptr_t)p.b.buf + 100, 100, p.b.mr->lkey};
	rwr.sg_list = &rsge;
	EQ_ERR(ibv_post_recv(p.b.qp, &rwr, &rbad), 0);
	EQ_ERR(to_rtr(p.a.qp, &p.b.ep, &o), 0);
	bad = NULL;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), EINVAL); /* RTR */
	CHECK(bad == &wr);
	EQ_ERR(to_rts(p.a.qp, p.a.ep.psn, &o), 0);
	EQ_ERR(to_rtr(p.b.qp, &p.a.ep, &o), 0);
	EQ_ERR(to_rts(p.b.qp, p.b.ep.psn, &o), 0);
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	fill(p.a.buf, 50, 4);
	POST(p.a.qp, IBV_WR_SEND, 2, p.a.buf, 50, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	struct ibv_wc wc = EXPECT_WC(p.b.rcq, 77, IBV_WC_SUCCESS, 5000);
	EQ(wc.byte_len, 50);
	CHECK_FILL(p.b.buf + 100, 50, 4);
	ibv_close_device(p.ctx);
}

/* Queue limits. A's destination never answers and A's timeout is 0 (wait forever), so
 * every request stays outstanding. */
static void t_post_limits(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(4096);
	c.q.send_wr = 8;
	c.q.recv_wr = 4;
	c.q.send_sge = 2;
	c.q.recv_sge = 2;
	c.q.inline_data = 64;
	c.connect = 0;
	struct qpo o = dflt();
	o.timeout = 0;
	pair_init2(&p, NULL, arg, &c, &o, &o);
	connect_qp(p.a.qp, &p.b.ep, p.a.ep.psn, &o);
	EQ_ERR(to_init(p.b.qp, o.access), 0); /* B stays in INIT: it drops everything */
	uint8_t *b = p.a.buf;
	uint32_t k = p.a.mr->lkey;
	struct ibv_sge sg[3] = {{(uintptr_t)b, 8, k}, {(uintptr_t)b + 8, 8, k}, {(uintptr_t)b + 16, 8, k}};
	struct ibv_send_wr wr, *bad;
	memset(&wr, 0, sizeof wr);
	wr.opcode = IBV_WR_RDMA_WRITE;
	wr.sg_list = sg;
	wr.wr.rdma.remote_addr = (uintptr_t)p.b.buf;
	wr.wr.rdma.rkey = p.b.mr->rkey;
	/* too many SGEs */
	wr.num_sge = 3;
	bad = NULL;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), EINVAL);
	CHECK(bad == &wr);
	/* inline data beyond max_inline_data */
	uint8_t big[65] = {0};
	struct ibv_sge isge = {(uintptr_t)big, 65, 0};
	wr.sg_list = &isge;
	wr.num_sge = 1;
	wr.send_flags = IBV_SEND_INLINE;
	bad = NULL;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), EINVAL);
	CHECK(bad == &wr);
	/* unknown opcodes and flags */
	wr.send_flags = 0;
	wr.sg_list = sg;
	wr.opcode = IBV_WR_LOCAL_INV;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), EINVAL);
	wr.opcode = (enum ibv_wr_opcode)99;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), EINVAL);
	wr.opcode = IBV_WR_RDMA_WRITE;
	wr.send_flags = IBV_SEND_IP_CSUM;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), EINVAL);
	wr.send_flags = 0;
	/* an atomic with a 4-byte SGE */
	wr.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
	sg[0].length = 4;
	wr.wr.atomic.remote_addr = (uintptr_t)p.b.buf;
	wr.wr.atomic.rkey = p.b.mr->rkey;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), EINVAL);
	sg[0].length = 8;
	/* the send queue fills at max_send_wr */
	wr.opcode = IBV_WR_RDMA_WRITE;
	wr.wr.rdma.remote_addr = (uintptr_t)p.b.buf;
	wr.wr.rdma.rkey = p.b.mr->rkey;
	wr.num_sge = 2; /* max_send_sge exactly */
	for (int i = 0; i < 8; i++) {
		wr.wr_id = (uint64_t)i;
		wr.send_flags = (i & 1) ? IBV_SEND_SIGNALED : 0;
		EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), 0);
	}
	wr.wr_id = 8;
	bad = NULL;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), ENOMEM);
	CHECK(bad == &wr);
	/* inline data up to max_inline_data is fine (but the queue is full) */
	wr.sg_list = &isge;
	isge.length = 64;
	wr.num_sge = 1;
	wr.send_flags = IBV_SEND_INLINE;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), ENOMEM);
	/* the receive queue fills at max_recv_wr */
	struct ibv_sge rs[3] = {{(uintptr_t)b, 8, k}, {(uintptr_t)b + 8, 8, k}, {(uintptr_t)b + 16, 8, k}};
	struct ibv_recv_wr rwr, *rbad;
	memset(&rwr, 0, sizeof rwr);
	rwr.sg_list = rs;
	rwr.num_sge = 3;
	rbad = NULL;
	EQ_ERR(ibv_post_recv(p.a.qp, &rwr, &rbad), EINVAL);
	CHECK(rbad == &rwr);
	rwr.num_sge = 2;
	for (int i = 0; i < 4; i++) {
		rwr.wr_id = 100 + (uint64_t)i;
		EQ_ERR(ibv_post_recv(p.a.qp, &rwr, &rbad), 0);
	}
	rbad = NULL;
	EQ_ERR(ibv_post_recv(p.a.qp, &rwr, &rbad), ENOMEM);
	CHECK(rbad == &rwr);
	expect_none(p.a.scq, 20, "a request to a destination that never answers");
	/* moving to ERR flushes all of it, signaled or not, in order */
	EQ_ERR(to_state(p.a.qp, IBV_QPS_ERR), 0);
	for (int i = 0; i < 8; i++) {
		struct ibv_wc w = EXPECT_WC(p.a.scq, i, IBV_WC_WR_FLUSH_ERR, 5000);
		EQ(w.qp_num, p.a.qp->qp_num);
	}
	for (int i = 0; i < 4; i++)
		EXPECT_WC(p.a.rcq, 100 + i, IBV_WC_WR_FLUSH_ERR, 5000);
	expect_none(p.a.scq, 20, "more than was posted");
	expect_none(p.a.rcq, 0, "more than was posted");
	ibv_close_device(p.ctx);
}

/* A chain stops at the first refused request; those before it are posted. */
static void t_post_chain(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(64 * KiB);
	c.q.send_sge = 1;
	c.q.recv_sge = 1;
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	struct ibv_sge sg[2] = {{(uintptr_t)p.a.buf, 100, p.a.mr->lkey},
				{(uintptr_t)p.a.buf + 100, 100, p.a.mr->lkey}};
	struct ibv_send_wr w[4], *bad = NULL;
	memset(w, 0, sizeof w);
	for (int i = 0; i < 4; i++) {
		w[i].wr_id = (uint64_t)i + 1;
		w[i].opcode = IBV_WR_RDMA_WRITE;
		w[i].sg_list = sg;
		w[i].num_sge = 1;
		w[i].send_flags = IBV_SEND_SIGNALED;
		w[i].wr.rdma.remote_addr = (uintptr_t)p.b.buf + 1000 * (uint64_t)i;
		w[i].wr.rdma.rkey = p.b.mr->rkey;
		w[i].next = i < 3 ? &w[i + 1] : NULL;
	}
	w[2].num_sge = 2; /* beyond max_send_sge */
	fill(p.a.buf, 100, 6);
	EQ_ERR(ibv_post_send(p.a.qp, &w[0], &bad), EINVAL);
	CHECK(bad == &w[2]);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 5000);
	expect_none(p.a.scq, 30, "a request after the refused one");
	CHECK_FILL(p.b.buf, 100, 6);
	CHECK_FILL(p.b.buf + 1000, 100, 6);
	CHECK(p.b.buf[3000] == 0);
	/* the same for receives */
	struct ibv_recv_wr r[3], *rbad = NULL;
	memset(r, 0, sizeof r);
	struct ibv_sge rsg[2] = {{(uintptr_t)p.b.buf + 8000, 100, p.b.mr->lkey},
				 {(uintptr_t)p.b.buf + 9000, 100, p.b.mr->lkey}};
	for (int i = 0; i < 3; i++) {
		r[i].wr_id = 50 + (uint64_t)i;
		r[i].sg_list = rsg;
		r[i].num_sge = 1;
		r[i].next = i < 2 ? &r[i + 1] : NULL;
	}
	r[1].num_sge = 2;
	EQ_ERR(ibv_post_recv(p.b.qp, &r[0], &rbad), EINVAL);
	CHECK(rbad == &r[1]);
	POST(p.a.qp, IBV_WR_SEND, 9, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.b.rcq, 50, IBV_WC_SUCCESS, 5000);
	POST(p.a.qp, IBV_WR_SEND, 10, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	expect_none(p.b.rcq, 30, "a receive after the refused one");
	ibv_close_device(p.ctx);
}

/* ================================================================== 7. the data path */
/* RDMA WRITE and READ of many sizes (multi-segment ones too), gather and scatter. */
static void t_write_read(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 4 * MiB);
	uint8_t *a = p.a.buf, *b = p.b.buf;
	static const uint32_t sizes[] = {1, 4096, 65537, 300001, MiB};
	for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
		uint32_t n = sizes[i];
		memset(b, 0, n + 16);
		fill(a + 3, n, 10 + i);
		POST(p.a.qp, IBV_WR_RDMA_WRITE, 100 + i, a + 3, n, p.a.mr->lkey, (uintptr_t)b + 7,
		     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
		struct ibv_wc wc = EXPECT_WC(p.a.scq, 100 + i, IBV_WC_SUCCESS, 10000);
		EQ(wc.opcode, IBV_WC_RDMA_WRITE);
		EQ(wc.qp_num, p.a.qp->qp_num);
		CHECK_FILL(b + 7, n, 10 + i);
		CHECKM(b[6] == 0 && b[7 + n] == 0, "a WRITE of %u bytes touched the bytes around it", n);
		uint8_t *src = b + 2 * MiB + 5, *dst = a + 2 * MiB + 1;
		fill(src, n, 50 + i);
		memset(dst - 1, 0, n + 16);
		POST(p.a.qp, IBV_WR_RDMA_READ, 200 + i, dst, n, p.a.mr->lkey, (uintptr_t)src,
		     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
		wc = EXPECT_WC(p.a.scq, 200 + i, IBV_WC_SUCCESS, 10000);
		EQ(wc.opcode, IBV_WC_RDMA_READ);
		EQ(wc.byte_len, n);
		CHECK_FILL(dst, n, 50 + i);
		CHECKM(dst[-1] == 0 && dst[n] == 0, "a READ of %u bytes touched the bytes around it", n);
	}
	/* a WRITE gathering three SGEs */
	struct ibv_sge g[3] = {{(uintptr_t)a, 1000, p.a.mr->lkey},
			       {(uintptr_t)a + 5000, 70001, p.a.mr->lkey},
			       {(uintptr_t)a + 200000, 30000, p.a.mr->lkey}};
	fill(a, 1000, 1);
	fill(a + 5000, 70001, 2);
	fill(a + 200000, 30000, 3);
	memset(b, 0, 200000);
	struct ibv_send_wr wr, *bad;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = 300;
	wr.opcode = IBV_WR_RDMA_WRITE;
	wr.sg_list = g;
	wr.num_sge = 3;
	wr.send_flags = IBV_SEND_SIGNALED;
	wr.wr.rdma.remote_addr = (uintptr_t)b + 11;
	wr.wr.rdma.rkey = p.b.mr->rkey;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), 0);
	EXPECT_WC(p.a.scq, 300, IBV_WC_SUCCESS, 10000);
	CHECK_FILL(b + 11, 1000, 1);
	CHECK_FILL(b + 1011, 70001, 2);
	CHECK_FILL(b + 71012, 30000, 3);
	CHECK(b[101012] == 0);
	/* a READ scattering into three SGEs */
	uint8_t *src = b + 3 * MiB;
	fill(src, 250001, 77);
	memset(a, 0, 2 * MiB);
	struct ibv_sge s[3] = {{(uintptr_t)a + 100, 100000, p.a.mr->lkey},
			       {(uintptr_t)a + 500000, 50001, p.a.mr->lkey},
			       {(uintptr_t)a + 300000, 100000, p.a.mr->lkey}};
	wr.wr_id = 301;
	wr.opcode = IBV_WR_RDMA_READ;
	wr.sg_list = s;
	wr.wr.rdma.remote_addr = (uintptr_t)src;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), 0);
	struct ibv_wc wc = EXPECT_WC(p.a.scq, 301, IBV_WC_SUCCESS, 10000);
	EQ(wc.byte_len, 250001);
	CHECK(!memcmp(a + 100, src, 100000));
	CHECK(!memcmp(a + 500000, src + 100000, 50001));
	CHECK(!memcmp(a + 300000, src + 150001, 100000));
	CHECK(a[99] == 0 && a[100100] == 0 && a[550001] == 0 && a[400000] == 0);
	/* zero-length WRITE and READ */
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 302, NULL, 0, 0, (uintptr_t)b, p.b.mr->rkey,
	     IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 302, IBV_WC_SUCCESS, 5000);
	POST(p.a.qp, IBV_WR_RDMA_READ, 303, NULL, 0, 0, (uintptr_t)b, p.b.mr->rkey,
	     IBV_SEND_SIGNALED, 0);
	wc = EXPECT_WC(p.a.scq, 303, IBV_WC_SUCCESS, 5000);
	EQ(wc.byte_len, 0);
	ibv_close_device(p.ctx);
}

static void t_write_imm(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	memset(p.b.buf + 32 * KiB, 0xee, 1000);
	RECV(p.b.qp, 41, p.b.buf + 32 * KiB, 1000, p.b.mr->lkey);
	RECV(p.b.qp, 42, NULL, 0, 0);
	fill(p.a.buf, 5000, 8);
	POST(p.a.qp, IBV_WR_RDMA_WRITE_WITH_IMM, 1, p.a.buf, 5000, p.a.mr->lkey,
	     (uintptr_t)p.b.buf + 10, p.b.mr->rkey, IBV_SEND_SIGNALED, htonl(0x12345678));
	struct ibv_wc wc = EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	EQ(wc.opcode, IBV_WC_RDMA_WRITE);
	wc = EXPECT_WC(p.b.rcq, 41, IBV_WC_SUCCESS, 5000);
	EQ(wc.opcode, IBV_WC_RECV_RDMA_WITH_IMM);
	CHECK(wc.wc_flags & IBV_WC_WITH_IMM);
	EQ(wc.imm_data, htonl(0x12345678));
	EQ(wc.byte_len, 5000);
	EQ(wc.qp_num, p.b.qp->qp_num);
	EQ(wc.src_qp, p.a.qp->qp_num);
	CHECK_FILL(p.b.buf + 10, 5000, 8);
	for (int i = 0; i < 1000; i++)
		CHECKM(p.b.buf[32 * KiB + i] == 0xee, "WRITE_WITH_IMM wrote into the receive buffer");
	/* zero length: no rkey is looked at */
	POST(p.a.qp, IBV_WR_RDMA_WRITE_WITH_IMM, 2, NULL, 0, 0, 0, 0, IBV_SEND_SIGNALED,
	     htonl(0xfeedbeef));
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 5000);
	wc = EXPECT_WC(p.b.rcq, 42, IBV_WC_SUCCESS, 5000);
	EQ(wc.opcode, IBV_WC_RECV_RDMA_WITH_IMM);
	EQ(wc.byte_len, 0);
	EQ(wc.imm_data, htonl(0xfeedbeef));
	ibv_close_device(p.ctx);
}

static void t_send_recv(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(256 * KiB);
	c.q.inline_data = 256;
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	uint8_t *a = p.a.buf, *b = p.b.buf;
	uint32_t ak = p.a.mr->lkey, bk = p.b.mr->lkey;
	/* gather 2 SGEs into a receive scattering over 3 */
	struct ibv_sge rs[3] = {{(uintptr_t)b + 1000, 100, bk},
				{(uintptr_t)b + 5000, 3000, bk},
				{(uintptr_t)b + 20000, 5000, bk}};
	struct ibv_recv_wr rwr, *rbad;
	memset(&rwr, 0, sizeof rwr);
	rwr.wr_id = 11;
	rwr.sg_list = rs;
	rwr.num_sge = 3;
	EQ_ERR(ibv_post_recv(p.b.qp, &rwr, &rbad), 0);
	uint8_t *msg = a + 100000;
	fill(msg, 6000, 21);
	memcpy(a + 10, msg, 4000);
	memcpy(a + 50000, msg + 4000, 2000);
	struct ibv_sge ss[2] = {{(uintptr_t)a + 10, 4000, ak}, {(uintptr_t)a + 50000, 2000, ak}};
	struct ibv_send_wr wr, *bad;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = 1;
	wr.opcode = IBV_WR_SEND;
	wr.sg_list = ss;
	wr.num_sge = 2;
	wr.send_flags = IBV_SEND_SIGNALED;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), 0);
	struct ibv_wc wc = EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	EQ(wc.opcode, IBV_WC_SEND);
	wc = EXPECT_WC(p.b.rcq, 11, IBV_WC_SUCCESS, 5000);
	EQ(wc.opcode, IBV_WC_RECV);
	EQ(wc.byte_len, 6000);
	CHECK(!(wc.wc_flags & IBV_WC_WITH_IMM));
	EQ(wc.qp_num, p.b.qp->qp_num);
	EQ(wc.src_qp, p.a.qp->qp_num);
	CHECK(!memcmp(b + 1000, msg, 100));
	CHECK(!memcmp(b + 5000, msg + 100, 3000));
	CHECK(!memcmp(b + 20000, msg + 3100, 2900));
	CHECK(b[22900] == 0 && b[1100] == 0 && b[999] == 0);
	/* SEND_WITH_IMM */
	RECV(p.b.qp, 12, b + 64 * KiB, 64 * KiB, bk);
	fill(a, 65536, 22);
	POST(p.a.qp, IBV_WR_SEND_WITH_IMM, 2, a, 65536, ak, 0, 0, IBV_SEND_SIGNALED, htonl(777));
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 5000);
	wc = EXPECT_WC(p.b.rcq, 12, IBV_WC_SUCCESS, 5000);
	EQ(wc.opcode, IBV_WC_RECV);
	CHECK(wc.wc_flags & IBV_WC_WITH_IMM);
	EQ(wc.imm_data, htonl(777));
	EQ(wc.byte_len, 65536);
	CHECK_FILL(b + 64 * KiB, 65536, 22);
	/* inline: copied at post time, the lkey is not looked at */
	uint8_t stackbuf[256];
	fill(stackbuf, 200, 23);
	RECV(p.b.qp, 13, b + 200 * KiB, 1000, bk);
	POST(p.a.qp, IBV_WR_SEND, 3, stackbuf, 200, 0xdeadbeef, 0, 0,
	     IBV_SEND_SIGNALED | IBV_SEND_INLINE, 0);
	memset(stackbuf, 0, sizeof stackbuf);
	EXPECT_WC(p.a.scq, 3, IBV_WC_SUCCESS, 5000);
	wc = EXPECT_WC(p.b.rcq, 13, IBV_WC_SUCCESS, 5000);
	EQ(wc.byte_len, 200);
	CHECK_FILL(b + 200 * KiB, 200, 23);
	fill(stackbuf, 256, 24);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 4, stackbuf, 256, 0, (uintptr_t)b + 210 * KiB,
	     p.b.mr->rkey, IBV_SEND_SIGNALED | IBV_SEND_INLINE, 0);
	memset(stackbuf, 0, sizeof stackbuf);
	EXPECT_WC(p.a.scq, 4, IBV_WC_SUCCESS, 5000);
	CHECK_FILL(b + 210 * KiB, 256, 24);
	/* zero-length SEND, into a receive with and without a buffer */
	RECV(p.b.qp, 14, NULL, 0, 0);
	RECV(p.b.qp, 15, b, 100, bk);
	POST(p.a.qp, IBV_WR_SEND, 5, NULL, 0, 0, 0, 0, IBV_SEND_SIGNALED, 0);
	POST(p.a.qp, IBV_WR_SEND_WITH_IMM, 6, NULL, 0, 0, 0, 0, IBV_SEND_SIGNALED, htonl(9));
	EXPECT_WC(p.a.scq, 5, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p.a.scq, 6, IBV_WC_SUCCESS, 5000);
	wc = EXPECT_WC(p.b.rcq, 14, IBV_WC_SUCCESS, 5000);
	EQ(wc.byte_len, 0);
	EQ(wc.opcode, IBV_WC_RECV);
	wc = EXPECT_WC(p.b.rcq, 15, IBV_WC_SUCCESS, 5000);
	EQ(wc.byte_len, 0);
	EQ(wc.imm_data, htonl(9));
	ibv_close_device(p.ctx);
}

static void t_atomics(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	uint64_t *target = (uint64_t *)(p.b.buf + 4096);
	uint64_t *res = (uint64_t *)(p.a.buf + 64);
	*target = 100;
	*res = 0xdeaddeaddeaddeadull;
	EQ_ERR(post_atomic(p.a.qp, IBV_WR_ATOMIC_FETCH_AND_ADD, 1, res, p.a.mr->lkey,
			   (uintptr_t)target, p.b.mr->rkey, 5, 0),
	       0);
	struct ibv_wc wc = EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	EQ(wc.opcode, IBV_WC_FETCH_ADD);
	EQ(wc.byte_len, 8);
	EQ(*res, 100);
	EQ(*target, 105);
	EQ_ERR(post_atomic(p.a.qp, IBV_WR_ATOMIC_CMP_AND_SWP, 2, res, p.a.mr->lkey,
			   (uintptr_t)target, p.b.mr->rkey, 105, 7),
	       0);
	wc = EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 5000);
	EQ(wc.opcode, IBV_WC_COMP_SWAP);
	EQ(*res, 105);
	EQ(*target, 7);
	EQ_ERR(post_atomic(p.a.qp, IBV_WR_ATOMIC_CMP_AND_SWP, 3, res, p.a.mr->lkey,
			   (uintptr_t)target, p.b.mr->rkey, 999, 1),
	       0);
	EXPECT_WC(p.a.scq, 3, IBV_WC_SUCCESS, 5000);
	EQ(*res, 7);	/* the original value, the compare failed */
	EQ(*target, 7); /* unchanged */
	/* 64-bit wrap-around, and many in a row */
	*target = UINT64_MAX;
	for (int i = 0; i < 50; i++)
		EQ_ERR(post_atomic(p.a.qp, IBV_WR_ATOMIC_FETCH_AND_ADD, 10 + (uint64_t)i,
				   (uint64_t *)(p.a.buf + 1024) + i, p.a.mr->lkey,
				   (uintptr_t)target, p.b.mr->rkey, 2, 0),
		       0);
	for (int i = 0; i < 50; i++)
		EXPECT_WC(p.a.scq, 10 + i, IBV_WC_SUCCESS, 5000);
	EQ(*target, 99);
	for (int i = 0; i < 50; i++)
		EQ(((uint64_t *)(p.a.buf + 1024))[i], UINT64_MAX + 2ull * (uint64_t)i);
	ibv_close_device(p.ctx);
}

/* Unsignaled requests complete silently; sq_sig_all signals everything. */
static void t_unsignaled(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	fill(p.a.buf, 6000, 31);
	for (int i = 0; i < 6; i++)
		POST(p.a.qp, IBV_WR_RDMA_WRITE, 1 + (uint64_t)i, p.a.buf + 1000 * i, 1000,
		     p.a.mr->lkey, (uintptr_t)p.b.buf + 1000 * (uint64_t)i, p.b.mr->rkey,
		     i == 5 ? IBV_SEND_SIGNALED : 0, 0);
	EXPECT_WC(p.a.scq, 6, IBV_WC_SUCCESS, 5000);
	expect_none(p.a.scq, 30, "an unsignaled WRITE");
	CHECK_FILL(p.b.buf, 6000, 31);
	ibv_close_device(p.ctx);

	struct pcfg c = pc(64 * KiB);
	c.q.sig_all = 1;
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	for (int i = 0; i < 4; i++)
		POST(p.a.qp, IBV_WR_RDMA_WRITE, 1 + (uint64_t)i, p.a.buf, 100, p.a.mr->lkey,
		     (uintptr_t)p.b.buf, p.b.mr->rkey, 0, 0);
	for (int i = 0; i < 4; i++)
		EXPECT_WC(p.a.scq, 1 + i, IBV_WC_SUCCESS, 5000);
	ibv_close_device(p.ctx);
}

/* Completions come in order per queue, whatever the mix of operations. */
static void t_order(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 1 * MiB);
	uint64_t *t = (uint64_t *)(p.b.buf + 512 * KiB);
	*t = 0;
	for (int i = 0; i < 100; i++)
		RECV(p.b.qp, 1000 + (uint64_t)i, p.b.buf + 600 * KiB + 1024 * (uint64_t)i, 1024,
		     p.b.mr->lkey);
	for (int i = 0; i < 200; i++) {
		uint32_t len = 1 + (uint32_t)(i * 997) % 4000;
		uint8_t *l = p.a.buf + 4096 * (uint64_t)(i % 64);
		uint64_t r = (uintptr_t)p.b.buf + 4096 * (uint64_t)(i % 64);
		switch (i % 5) {
		case 0:
			POST(p.a.qp, IBV_WR_RDMA_WRITE, (uint64_t)i, l, len, p.a.mr->lkey, r,
			     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
			break;
		case 1:
			POST(p.a.qp, IBV_WR_RDMA_READ, (uint64_t)i, l, len, p.a.mr->lkey, r,
			     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
			break;
		case 2:
			POST(p.a.qp, IBV_WR_SEND, (uint64_t)i, l, len % 1024, p.a.mr->lkey, 0, 0,
			     IBV_SEND_SIGNALED, 0);
			break;
		case 3:
			EQ_ERR(post_atomic(p.a.qp, IBV_WR_ATOMIC_FETCH_AND_ADD, (uint64_t)i,
					   p.a.buf + 512 * KiB + 8 * (uint64_t)i, p.a.mr->lkey,
					   (uintptr_t)t, p.b.mr->rkey, 1, 0),
			       0);
			break;
		default:
			POST(p.a.qp, IBV_WR_SEND_WITH_IMM, (uint64_t)i, l, len % 1024, p.a.mr->lkey,
			     0, 0, IBV_SEND_SIGNALED, htonl((uint32_t)i));
		}
	}
	for (int i = 0; i < 200; i++) {
		struct ibv_wc wc = wait_wc(p.a.scq, 10000, "the ordered burst");
		CHECKM(wc.wr_id == (uint64_t)i, "completion %d is wr_id %llu", i,
		       (unsigned long long)wc.wr_id);
		EQ_ST(wc, IBV_WC_SUCCESS);
	}
	for (int i = 0; i < 80; i++) {
		struct ibv_wc wc = wait_wc(p.b.rcq, 10000, "the receives");
		EQ(wc.wr_id, 1000 + i);
		EQ_ST(wc, IBV_WC_SUCCESS);
		int k = i / 2 * 5 + (i % 2 ? 4 : 2);
		EQ(wc.byte_len, (1 + (uint32_t)(k * 997) % 4000) % 1024);
	}
	EQ(*t, 40);
	ibv_close_device(p.ctx);
}

/* 2000 WRITEs through a 64-deep send queue, posted as space frees. */
static void t_burst(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(2 * MiB + 4096);
	c.q.send_wr = 64;
	c.cqe = 128;
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	const int total = 2000, slot = 1024;
	for (int i = 0; i < total; i++)
		fill(p.a.buf + (size_t)i * slot, (size_t)slot, (unsigned)i);
	int posted = 0, done = 0;
	double end = now_ms() + 20000;
	while (done < total) {
		while (posted < total && posted - done < 64) {
			unsigned fl = (posted % 4 == 3 || posted == total - 1) ? IBV_SEND_SIGNALED : 0;
			int rc = post_wr(p.a.qp, IBV_WR_RDMA_WRITE, (uint64_t)posted,
					 p.a.buf + (size_t)posted * slot, (uint32_t)slot, p.a.mr->lkey,
					 (uintptr_t)p.b.buf + (uint64_t)posted * slot, p.b.mr->rkey,
					 fl, 0);
			CHECKM(rc == 0, "post %d with %d outstanding: %s", posted, posted - done,
			       strerror(rc));
			posted++;
		}
		struct ibv_wc wc[16];
		int n = ibv_poll_cq(p.a.scq, 16, wc);
		CHECK(n >= 0);
		for (int i = 0; i < n; i++) {
			EQ_ST(wc[i], IBV_WC_SUCCESS);
			int id = (int)wc[i].wr_id;
			CHECKM(id == (done + 3 < total ? done + 3 : total - 1),
			       "completion for wr_id %d, expected %d", id, done + 3);
			done = id + 1;
		}
		if (!n) {
			CHECKM(now_ms() < end, "stuck at %d of %d", done, total);
			nap_us(20);
		}
	}
	for (int i = 0; i < total; i++)
		CHECK_FILL(p.b.buf + (size_t)i * slot, (size_t)slot, (unsigned)i);
	ibv_close_device(p.ctx);
}

/* A region registered with an iova is addressed by it. */
static void t_iova(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	struct ibv_mr *z = ibv_reg_mr_iova(p.pd, p.b.buf, 64 * KiB, 0x7000000, ALL_ACCESS);
	CHECKM(z, "ibv_reg_mr_iova: %s", strerror(errno));
	fill(p.a.buf, 3000, 41);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 3000, p.a.mr->lkey, 0x7000000 + 100, z->rkey,
	     IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	CHECK_FILL(p.b.buf + 100, 3000, 41);
	/* the iova range is what counts, not the virtual address */
	POST(p.a.qp, IBV_WR_RDMA_READ, 2, p.a.buf + 8192, 3000, p.a.mr->lkey, 0x7000000 + 100,
	     z->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 5000);
	CHECK_FILL(p.a.buf + 8192, 3000, 41);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 3, p.a.buf, 10, p.a.mr->lkey, (uintptr_t)p.b.buf, z->rkey,
	     IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 3, IBV_WC_REM_ACCESS_ERR, 5000);
	ibv_close_device(p.ctx);
}

/* ================================================================== 8. asynchronous completions */
/* Completions are never delivered inside ibv_post_send. */
static void t_async_default(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	int empty = 0;
	for (int i = 0; i < 50; i++) {
		POST(p.a.qp, IBV_WR_RDMA_WRITE, (uint64_t)i, p.a.buf, 64, p.a.mr->lkey,
		     (uintptr_t)p.b.buf, p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
		struct ibv_wc wc;
		int n = ibv_poll_cq(p.a.scq, 1, &wc);
		if (n == 0) {
			empty++;
			wc = EXPECT_WC(p.a.scq, i, IBV_WC_SUCCESS, 5000);
		} else {
			EQ(n, 1);
			EQ(wc.wr_id, i);
			EQ_ST(wc, IBV_WC_SUCCESS);
		}
	}
	CHECKM(empty > 0, "every completion was there right after ibv_post_send returned");
	ibv_close_device(p.ctx);
}

/* SOFTRDMA_LATENCY_US=2000-3000: completions arrive 2-3 ms after the work is done. */
static void t_latency(const void *arg)
{
	const char *v = getenv("SOFTRDMA_LATENCY_US");
	CHECKM(v && !strcmp(v, "2000-3000"), "needs SOFTRDMA_LATENCY_US=2000-3000");
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	int empty = 0;
	for (int i = 0; i < 20; i++) {
		if (i % 2)
			RECV(p.b.qp, 100 + (uint64_t)i, p.b.buf + 1024, 1024, p.b.mr->lkey);
		double t0 = now_ms();
		POST(p.a.qp, i % 2 ? IBV_WR_SEND : IBV_WR_RDMA_WRITE, (uint64_t)i, p.a.buf, 64,
		     p.a.mr->lkey, (uintptr_t)p.b.buf, p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
		struct ibv_wc wc;
		if (ibv_poll_cq(p.a.scq, 1, &wc) == 0)
			empty++;
		EXPECT_WC(p.a.scq, i, IBV_WC_SUCCESS, 5000);
		double dt = now_ms() - t0;
		CHECKM(dt >= 1.95, "completion %d after %.3f ms with a 2-3 ms latency", i, dt);
		CHECKM(dt < 1000, "completion %d after %.0f ms", i, dt);
		if (i % 2) {
			EXPECT_WC(p.b.rcq, 100 + i, IBV_WC_SUCCESS, 5000);
			CHECKM(now_ms() - t0 >= 1.95, "receive completion too early");
		}
	}
	EQ(empty, 20);
	/* order per queue is kept under random latencies */
	for (int i = 0; i < 100; i++)
		POST(p.a.qp, IBV_WR_RDMA_WRITE, 1000 + (uint64_t)i, p.a.buf, 64, p.a.mr->lkey,
		     (uintptr_t)p.b.buf, p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	for (int i = 0; i < 100; i++)
		EXPECT_WC(p.a.scq, 1000 + i, IBV_WC_SUCCESS, 5000);
	ibv_close_device(p.ctx);
}

/* ================================================================== 9. errors */
/* A bad rkey: REM_ACCESS_ERR, the rest flushed (unsignaled too), both QPs in ERR, the
 * responder's receives flushed and IBV_EVENT_QP_ACCESS_ERR raised on its context. */
static void t_err_rkey(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	RECV(p.b.qp, 21, p.b.buf, 100, p.b.mr->lkey);
	RECV(p.b.qp, 22, p.b.buf, 100, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey + 0x10000000u, IBV_SEND_SIGNALED, 0);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 2, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, 0, 0);
	POST(p.a.qp, IBV_WR_SEND, 3, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	struct ibv_wc wc = EXPECT_WC(p.a.scq, 1, IBV_WC_REM_ACCESS_ERR, 5000);
	EQ(wc.qp_num, p.a.qp->qp_num);
	/* the opcode of an error completion is undefined: not a valid one here */
	CHECKM(wc.opcode != IBV_WC_RDMA_WRITE && wc.opcode != IBV_WC_SEND &&
		       wc.opcode != IBV_WC_RECV && wc.opcode != IBV_WC_RDMA_READ &&
		       (unsigned)wc.opcode > IBV_WC_RECV_RDMA_WITH_IMM,
	       "an error completion with opcode %d", (int)wc.opcode);
	EXPECT_WC(p.a.scq, 2, IBV_WC_WR_FLUSH_ERR, 5000);
	EXPECT_WC(p.a.scq, 3, IBV_WC_WR_FLUSH_ERR, 5000);
	expect_none(p.a.scq, 20, "after the flush");
	EQ(query_state(p.a.qp), IBV_QPS_ERR);
	EQ(p.a.qp->state, IBV_QPS_ERR); /* refreshed by ibv_query_qp */
	EXPECT_WC(p.b.rcq, 21, IBV_WC_WR_FLUSH_ERR, 5000);
	EXPECT_WC(p.b.rcq, 22, IBV_WC_WR_FLUSH_ERR, 5000);
	struct ibv_async_event ev;
	CHECKM(get_async(p.ctx, IBV_EVENT_QP_ACCESS_ERR, &ev, 2000),
	       "no IBV_EVENT_QP_ACCESS_ERR on the responder's context");
	CHECK(ev.element.qp == p.b.qp);
	ibv_ack_async_event(&ev);
	EQ(query_state(p.b.qp), IBV_QPS_ERR);
	CHECKM(p.b.buf[0] == 0, "the refused WRITE landed");
	/* posting in ERR completes with a flush, signaled or not */
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 4, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, 0, 0);
	EXPECT_WC(p.a.scq, 4, IBV_WC_WR_FLUSH_ERR, 5000);
	RECV(p.b.qp, 23, p.b.buf, 100, p.b.mr->lkey);
	EXPECT_WC(p.b.rcq, 23, IBV_WC_WR_FLUSH_ERR, 5000);
	double t0 = now_ms();
	EQ_ERR(ibv_destroy_qp(p.b.qp), 0); /* its event was acknowledged: no wait */
	CHECK(now_ms() - t0 < 500);
	ibv_close_device(p.ctx);
}

/* The responder refuses: status `st` for the requester (and event `ev` on the responder
 * unless 0). The pair is closed. */
static void expect_refused(struct pair *p, uint64_t id, enum ibv_wc_status st,
			   enum ibv_event_type ev)
{
	EXPECT_WC(p->a.scq, id, st, 5000);
	EQ(query_state(p->a.qp), IBV_QPS_ERR);
	if (ev) {
		struct ibv_async_event e;
		CHECKM(get_async(p->ctx, ev, &e, 2000), "no async event %s on the responder",
		       ibv_event_type_str(ev));
		CHECK(e.element.qp == p->b.qp);
		ibv_ack_async_event(&e);
	}
	for (int i = 0; i < 100 && query_state(p->b.qp) != IBV_QPS_ERR; i++)
		nap_us(1000);
	EQ(query_state(p->b.qp), IBV_QPS_ERR);
	ibv_close_device(p->ctx);
}

static void t_err_remote(const void *arg)
{
	struct pair p;
	/* a range beyond the region; the failing request is unsignaled */
	pair_init(&p, arg, 64 * KiB);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 100, p.a.mr->lkey,
	     (uintptr_t)p.b.buf + 64 * KiB - 10, p.b.mr->rkey, 0, 0);
	expect_refused(&p, 1, IBV_WC_REM_ACCESS_ERR, IBV_EVENT_QP_ACCESS_ERR);
	/* a READ beyond the region */
	pair_init(&p, arg, 64 * KiB);
	POST(p.a.qp, IBV_WR_RDMA_READ, 1, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf - 1,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	expect_refused(&p, 1, IBV_WC_REM_ACCESS_ERR, IBV_EVENT_QP_ACCESS_ERR);
	/* a region without REMOTE_WRITE (READs from it work) */
	pair_init(&p, arg, 64 * KiB);
	struct ibv_mr *ro = ibv_reg_mr(p.pd, p.b.buf, 4096,
				       IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ);
	CHECK(ro);
	fill(p.b.buf, 100, 51);
	POST(p.a.qp, IBV_WR_RDMA_READ, 1, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     ro->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	CHECK_FILL(p.a.buf, 100, 51);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 2, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     ro->rkey, IBV_SEND_SIGNALED, 0);
	expect_refused(&p, 2, IBV_WC_REM_ACCESS_ERR, IBV_EVENT_QP_ACCESS_ERR);
	/* a region without REMOTE_ATOMIC */
	pair_init(&p, arg, 64 * KiB);
	ro = ibv_reg_mr(p.pd, p.b.buf, 4096, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
	EQ_ERR(post_atomic(p.a.qp, IBV_WR_ATOMIC_FETCH_AND_ADD, 1, p.a.buf, p.a.mr->lkey,
			   (uintptr_t)p.b.buf, ro->rkey, 1, 0),
	       0);
	expect_refused(&p, 1, IBV_WC_REM_ACCESS_ERR, IBV_EVENT_QP_ACCESS_ERR);
	/* a region of another protection domain */
	pair_init(&p, arg, 64 * KiB);
	struct ibv_pd *pd2 = ibv_alloc_pd(p.ctx);
	struct ibv_mr *other = ibv_reg_mr(pd2, p.b.buf, 4096, ALL_ACCESS);
	CHECK(other);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     other->rkey, IBV_SEND_SIGNALED, 0);
	expect_refused(&p, 1, IBV_WC_REM_ACCESS_ERR, IBV_EVENT_QP_ACCESS_ERR);
	/* a QP without IBV_ACCESS_REMOTE_READ: WRITEs work, a READ is refused */
	struct pcfg c = pc(64 * KiB);
	struct qpo oa = dflt(), ob = dflt();
	ob.access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
	pair_init2(&p, NULL, arg, &c, &oa, &ob);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	POST(p.a.qp, IBV_WR_RDMA_READ, 2, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	expect_refused(&p, 2, IBV_WC_REM_ACCESS_ERR, IBV_EVENT_QP_ACCESS_ERR);
	/* a QP without IBV_ACCESS_REMOTE_WRITE: READs work, a WRITE is refused */
	ob.access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ;
	pair_init2(&p, NULL, arg, &c, &oa, &ob);
	POST(p.a.qp, IBV_WR_RDMA_READ, 1, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	POST(p.a.qp, IBV_WR_RDMA_WRITE_WITH_IMM, 2, p.a.buf, 100, p.a.mr->lkey,
	     (uintptr_t)p.b.buf, p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	expect_refused(&p, 2, IBV_WC_REM_ACCESS_ERR, IBV_EVENT_QP_ACCESS_ERR);
}

/* The requester's own side is wrong: LOC_PROT_ERR, the rest flushed, the responder
 * untouched. */
static void expect_local(struct pair *p, uint64_t id, enum ibv_wc_status st)
{
	POST(p->a.qp, IBV_WR_RDMA_WRITE, id + 1, p->a.buf, 10, p->a.mr->lkey,
	     (uintptr_t)p->b.buf, p->b.mr->rkey, 0, 0);
	EXPECT_WC(p->a.scq, id, st, 5000);
	EXPECT_WC(p->a.scq, id + 1, IBV_WC_WR_FLUSH_ERR, 5000);
	EQ(query_state(p->a.qp), IBV_QPS_ERR);
	EQ(query_state(p->b.qp), IBV_QPS_RTS);
	ibv_close_device(p->ctx);
}

static void t_err_local(const void *arg)
{
	struct pair p;
	/* an unknown lkey */
	pair_init(&p, arg, 64 * KiB);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 100, p.a.mr->lkey + 0x10000000u,
	     (uintptr_t)p.b.buf, p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	expect_local(&p, 1, IBV_WC_LOC_PROT_ERR);
	/* an SGE that runs past its region */
	pair_init(&p, arg, 64 * KiB);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf + 64 * KiB - 50, 100, p.a.mr->lkey, 0, 0,
	     IBV_SEND_SIGNALED, 0);
	expect_local(&p, 1, IBV_WC_LOC_PROT_ERR);
	/* a READ into a region without LOCAL_WRITE */
	pair_init(&p, arg, 64 * KiB);
	struct ibv_mr *ro = ibv_reg_mr(p.pd, p.a.buf, 4096, IBV_ACCESS_REMOTE_READ);
	CHECK(ro);
	POST(p.a.qp, IBV_WR_RDMA_READ, 1, p.a.buf, 100, ro->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	expect_local(&p, 1, IBV_WC_LOC_PROT_ERR);
	/* an atomic result buffer without LOCAL_WRITE */
	pair_init(&p, arg, 64 * KiB);
	ro = ibv_reg_mr(p.pd, p.a.buf, 4096, 0);
	EQ_ERR(post_atomic(p.a.qp, IBV_WR_ATOMIC_FETCH_AND_ADD, 1, p.a.buf, ro->lkey,
			   (uintptr_t)p.b.buf, p.b.mr->rkey, 1, 0),
	       0);
	expect_local(&p, 1, IBV_WC_LOC_PROT_ERR);
	/* a region of another protection domain */
	pair_init(&p, arg, 64 * KiB);
	struct ibv_pd *pd2 = ibv_alloc_pd(p.ctx);
	struct ibv_mr *other = ibv_reg_mr(pd2, p.a.buf, 4096, ALL_ACCESS);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 100, other->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	expect_local(&p, 1, IBV_WC_LOC_PROT_ERR);
}

/* A SEND longer than the receive: REM_INV_REQ_ERR for the sender, LOC_LEN_ERR for the
 * receive, the receiver's other receives flushed. A receive with a bad lkey:
 * REM_OP_ERR / LOC_PROT_ERR. */
static void t_err_recv(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	RECV(p.b.qp, 31, p.b.buf, 100, p.b.mr->lkey);
	RECV(p.b.qp, 32, p.b.buf + 1000, 1000, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 200, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.b.rcq, 31, IBV_WC_LOC_LEN_ERR, 5000);
	EXPECT_WC(p.b.rcq, 32, IBV_WC_WR_FLUSH_ERR, 5000);
	expect_refused(&p, 1, IBV_WC_REM_INV_REQ_ERR, IBV_EVENT_QP_REQ_ERR);

	pair_init(&p, arg, 64 * KiB);
	RECV(p.b.qp, 31, p.b.buf, 100, p.b.mr->lkey + 0x10000000u);
	RECV(p.b.qp, 32, p.b.buf, 100, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 50, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.b.rcq, 31, IBV_WC_LOC_PROT_ERR, 5000);
	EXPECT_WC(p.b.rcq, 32, IBV_WC_WR_FLUSH_ERR, 5000);
	expect_refused(&p, 1, IBV_WC_REM_OP_ERR, 0);
}

/* Above the port's max_msg_sz (8 MiB on soft1): LOC_LEN_ERR; exactly 8 MiB works. */
static void t_err_msg_size(const void *arg)
{
	(void)arg;
	struct pair p;
	pair_init(&p, "soft1", 8 * MiB + 4096);
	fill(p.a.buf, 8 * MiB, 61);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 8 * MiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 20000);
	CHECK_FILL(p.b.buf, 8 * MiB, 61);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 2, p.a.buf, 8 * MiB + 1, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	expect_local(&p, 2, IBV_WC_LOC_LEN_ERR);
	pair_init(&p, "soft1", 8 * MiB + 4096);
	RECV(p.b.qp, 9, p.b.buf, 8 * MiB + 4096, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 8 * MiB + 1, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	expect_local(&p, 1, IBV_WC_LOC_LEN_ERR);
}

/* Modify to ERR flushes both queues; posting in ERR flushes; RESET makes the QP
 * usable again. */
static void t_err_modify(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(64 * KiB);
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	for (int i = 0; i < 3; i++)
		RECV(p.b.qp, 10 + (uint64_t)i, p.b.buf, 100, p.b.mr->lkey);
	EQ_ERR(to_state(p.b.qp, IBV_QPS_ERR), 0);
	EQ(p.b.qp->state, IBV_QPS_ERR);
	for (int i = 0; i < 3; i++) {
		struct ibv_wc wc = EXPECT_WC(p.b.rcq, 10 + i, IBV_WC_WR_FLUSH_ERR, 5000);
		EQ(wc.qp_num, p.b.qp->qp_num);
	}
	POST(p.b.qp, IBV_WR_SEND, 20, p.b.buf, 10, p.b.mr->lkey, 0, 0, 0, 0);
	POST(p.b.qp, IBV_WR_RDMA_READ, 21, p.b.buf, 10, p.b.mr->lkey, (uintptr_t)p.a.buf,
	     p.a.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.b.scq, 20, IBV_WC_WR_FLUSH_ERR, 5000);
	EXPECT_WC(p.b.scq, 21, IBV_WC_WR_FLUSH_ERR, 5000);
	RECV(p.b.qp, 22, p.b.buf, 100, p.b.mr->lkey);
	EXPECT_WC(p.b.rcq, 22, IBV_WC_WR_FLUSH_ERR, 5000);
	expect_none(p.b.scq, 20, "after the flush");
	expect_none(p.b.rcq, 0, "after the flush");
	/* back through RESET, both sides reconnected with fresh PSNs */
	EQ_ERR(to_state(p.b.qp, IBV_QPS_RESET), 0);
	EQ_ERR(to_state(p.a.qp, IBV_QPS_ERR), 0);
	EQ_ERR(to_state(p.a.qp, IBV_QPS_RESET), 0);
	p.a.ep.psn = 0x777;
	p.b.ep.psn = 0x999;
	connect_qp(p.a.qp, &p.b.ep, p.a.ep.psn, &o);
	connect_qp(p.b.qp, &p.a.ep, p.b.ep.psn, &o);
	RECV(p.b.qp, 30, p.b.buf + 2000, 100, p.b.mr->lkey);
	fill(p.a.buf, 100, 71);
	POST(p.a.qp, IBV_WR_SEND, 31, p.a.buf, 100, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 31, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p.b.rcq, 30, IBV_WC_SUCCESS, 5000);
	CHECK_FILL(p.b.buf + 2000, 100, 71);
	ibv_close_device(p.ctx);
}

/* The responder goes to ERR while a long SEND is arriving: the receive is flushed once
 * and nothing else completes; the requester is not acknowledged (it times out). */
static void t_err_midmessage_send(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(8 * MiB + 4096);
	struct qpo oa = dflt(), ob = dflt();
	oa.timeout = 10;
	oa.retry_cnt = 2;
	pair_init2(&p, NULL, arg, &c, &oa, &ob);
	volatile uint8_t *b = p.b.buf;
	RECV(p.b.qp, 1, p.b.buf, 8 * MiB, p.b.mr->lkey);
	RECV(p.b.qp, 2, p.b.buf, 100, p.b.mr->lkey);
	memset(p.a.buf, 0x5c, 8 * MiB);
	POST(p.a.qp, IBV_WR_SEND, 9, p.a.buf, 8 * MiB, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	double end = now_ms() + 5000;
	while (b[256 * KiB] != 0x5c)
		CHECKM(now_ms() < end, "the SEND did not start arriving");
	EQ_ERR(to_state(p.b.qp, IBV_QPS_ERR), 0);
	struct ibv_wc wc[2];
	int n = poll_for(p.b.rcq, wc, 2, 5000);
	CHECKM(n == 2, "%d receive completions for 2 posted receives", n);
	expect_none(p.b.rcq, 50, "a third completion for two receives");
	EQ(wc[1].wr_id, 2);
	EQ_ST(wc[1], IBV_WC_WR_FLUSH_ERR);
	EQ(wc[0].wr_id, 1);
	int arrived = wc[0].status == IBV_WC_SUCCESS; /* it won the race against the ERR */
	if (!arrived)
		EQ_ST(wc[0], IBV_WC_WR_FLUSH_ERR);
	RECV(p.b.qp, 3, p.b.buf, 100, p.b.mr->lkey);
	EXPECT_WC(p.b.rcq, 3, IBV_WC_WR_FLUSH_ERR, 5000);
	expect_none(p.b.rcq, 20, "after the flush");
	EXPECT_WC(p.a.scq, 9, arrived ? IBV_WC_SUCCESS : IBV_WC_RETRY_EXC_ERR, 5000);
	ibv_close_device(p.ctx);
}

/* The responder goes to ERR while a long READ's response is going out: the requester
 * times out (RETRY_EXC_ERR) instead of waiting forever. */
static void t_err_midmessage_read(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(8 * MiB + 4096);
	struct qpo oa = dflt(), ob = dflt();
	oa.timeout = 10;
	oa.retry_cnt = 2;
	pair_init2(&p, NULL, arg, &c, &oa, &ob);
	volatile uint8_t *a = p.a.buf;
	memset(p.b.buf, 0x6d, 8 * MiB);
	POST(p.a.qp, IBV_WR_RDMA_READ, 9, p.a.buf, 8 * MiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	double end = now_ms() + 5000;
	while (a[256 * KiB] != 0x6d)
		CHECKM(now_ms() < end, "the READ response did not start arriving");
	EQ_ERR(to_state(p.b.qp, IBV_QPS_ERR), 0);
	struct ibv_wc wc = wait_wc(p.a.scq, 5000, "the READ whose responder went to ERR");
	EQ(wc.wr_id, 9);
	CHECKM(wc.status == IBV_WC_RETRY_EXC_ERR || wc.status == IBV_WC_SUCCESS,
	       "status %s", st_str(wc.status));
	ibv_close_device(p.ctx);
}

/* ================================================================== 10. receiver not ready */
static void t_rnr_recover(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(64 * KiB);
	struct qpo oa = dflt(), ob = dflt();
	oa.rnr_retry = 7;	/* infinite */
	ob.min_rnr_timer = 12; /* 0.64 ms */
	pair_init2(&p, NULL, arg, &c, &oa, &ob);
	fill(p.a.buf, 3000, 81);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 3000, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	POST(p.a.qp, IBV_WR_RDMA_WRITE_WITH_IMM, 2, p.a.buf, 3000, p.a.mr->lkey,
	     (uintptr_t)p.b.buf + 8192, p.b.mr->rkey, IBV_SEND_SIGNALED, htonl(3));
	expect_none(p.a.scq, 20, "a SEND with no receive posted");
	RECV(p.b.qp, 11, p.b.buf, 4096, p.b.mr->lkey);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	struct ibv_wc wc = EXPECT_WC(p.b.rcq, 11, IBV_WC_SUCCESS, 5000);
	EQ(wc.byte_len, 3000);
	CHECK_FILL(p.b.buf, 3000, 81);
	expect_none(p.a.scq, 10, "a WRITE_WITH_IMM with no receive posted");
	RECV(p.b.qp, 12, NULL, 0, 0);
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 5000);
	wc = EXPECT_WC(p.b.rcq, 12, IBV_WC_SUCCESS, 5000);
	EQ(wc.imm_data, htonl(3));
	CHECK_FILL(p.b.buf + 8192, 3000, 81);
	expect_none(p.b.rcq, 20, "a duplicate receive completion");
	ibv_close_device(p.ctx);
}

/* The RNR NAK comes back while a long SEND is still being transmitted. */
static void t_rnr_long_send(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(8 * MiB);
	struct qpo oa = dflt(), ob = dflt();
	ob.min_rnr_timer = 12;
	pair_init2(&p, NULL, arg, &c, &oa, &ob);
	fill(p.a.buf, 8 * MiB, 83);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 8 * MiB, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 2, p.a.buf, 1000, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	expect_none(p.a.scq, 20, "a SEND with no receive posted");
	RECV(p.b.qp, 11, p.b.buf, 8 * MiB, p.b.mr->lkey);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 5000);
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 5000);
	struct ibv_wc wc = EXPECT_WC(p.b.rcq, 11, IBV_WC_SUCCESS, 5000);
	EQ(wc.byte_len, 8 * MiB);
	CHECK_FILL(p.b.buf, 8 * MiB, 83);
	ibv_close_device(p.ctx);
	/* and with the RNR retries exhausted */
	oa.rnr_retry = 1;
	pair_init2(&p, NULL, arg, &c, &oa, &ob);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 8 * MiB, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_RNR_RETRY_EXC_ERR, 5000);
	ibv_close_device(p.ctx);
}

static void t_rnr_exceeded(const void *arg)
{
	for (int retries = 0; retries <= 3; retries += 3) {
		struct pair p;
		struct pcfg c = pc(64 * KiB);
		struct qpo oa = dflt(), ob = dflt();
		oa.rnr_retry = (uint8_t)retries;
		ob.min_rnr_timer = 1; /* 10 us */
		pair_init2(&p, NULL, arg, &c, &oa, &ob);
		POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 100, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
		POST(p.a.qp, IBV_WR_RDMA_WRITE, 2, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
		     p.b.mr->rkey, 0, 0);
		EXPECT_WC(p.a.scq, 1, IBV_WC_RNR_RETRY_EXC_ERR, 2000);
		EXPECT_WC(p.a.scq, 2, IBV_WC_WR_FLUSH_ERR, 2000);
		EQ(query_state(p.a.qp), IBV_QPS_ERR);
		EQ(query_state(p.b.qp), IBV_QPS_RTS); /* RNR is no error of the responder */
		ibv_close_device(p.ctx);
	}
}

/* SOFTRDMA_FAULTS=rnr=3: the first three SEND / WRITE_WITH_IMM get an RNR NAK. */
static void fault_rnr_pair(struct pair *p, const char *dev, uint8_t rnr_retry)
{
	const char *v = getenv("SOFTRDMA_FAULTS");
	CHECKM(v && !strcmp(v, "rnr=3"), "needs SOFTRDMA_FAULTS=rnr=3");
	struct pcfg c = pc(64 * KiB);
	struct qpo oa = dflt(), ob = dflt();
	oa.rnr_retry = rnr_retry;
	ob.min_rnr_timer = 14; /* 0.96 ms */
	pair_init2(p, NULL, dev, &c, &oa, &ob);
}

static void t_fault_rnr_exceeded(const void *arg)
{
	struct pair p;
	fault_rnr_pair(&p, arg, 2);
	RECV(p.b.qp, 1, p.b.buf, 100, p.b.mr->lkey);
	/* WRITEs take no receive and see no RNR */
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 10, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 2000);
	POST(p.a.qp, IBV_WR_SEND, 2, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 2, IBV_WC_RNR_RETRY_EXC_ERR, 2000);
	expect_none(p.b.rcq, 10, "a receive of a SEND that failed");
	ibv_close_device(p.ctx);
}

static void t_fault_rnr_recovers(const void *arg)
{
	struct pair p;
	fault_rnr_pair(&p, arg, 3);
	RECV(p.b.qp, 1, p.b.buf, 100, p.b.mr->lkey);
	RECV(p.b.qp, 2, p.b.buf + 100, 100, p.b.mr->lkey);
	fill(p.a.buf, 50, 82);
	double t0 = now_ms();
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 50, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 2000);
	CHECKM(now_ms() - t0 >= 2.5, "three RNR NAKs of 0.96 ms took %.2f ms", now_ms() - t0);
	struct ibv_wc wc = EXPECT_WC(p.b.rcq, 1, IBV_WC_SUCCESS, 2000);
	EQ(wc.byte_len, 50);
	CHECK_FILL(p.b.buf, 50, 82);
	/* the fault is spent: the next one goes through at once */
	POST(p.a.qp, IBV_WR_SEND, 2, p.a.buf, 50, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 2000);
	EXPECT_WC(p.b.rcq, 2, IBV_WC_SUCCESS, 2000);
	expect_none(p.b.rcq, 20, "a duplicate receive");
	ibv_close_device(p.ctx);
}

/* ================================================================== 11. timeouts, dead peers */
/* The destination goes to RTR 5 ms after the first transmission: a retransmission
 * delivers the request, and the destination sees IBV_EVENT_COMM_EST. */
static void t_to_late_rtr(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(64 * KiB);
	c.connect = 0;
	struct qpo oa = dflt(), ob = dflt();
	oa.timeout = 10; /* 4.2 ms */
	oa.retry_cnt = 7;
	pair_init2(&p, NULL, arg, &c, &oa, &ob);
	connect_qp(p.a.qp, &p.b.ep, p.a.ep.psn, &oa);
	EQ_ERR(to_init(p.b.qp, ob.access), 0);
	fill(p.a.buf, 1000, 91);
	double t0 = now_ms();
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 1000, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	nap_us(5000);
	expect_none(p.a.scq, 0, "a WRITE to a QP in INIT");
	EQ_ERR(to_rtr(p.b.qp, &p.a.ep, &ob), 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 2000);
	CHECKM(now_ms() - t0 >= 5, "completed after %.1f ms, before the destination was in RTR",
	       now_ms() - t0);
	CHECK_FILL(p.b.buf, 1000, 91);
	struct ibv_async_event ev;
	CHECKM(get_async(p.ctx, IBV_EVENT_COMM_EST, &ev, 1000), "no IBV_EVENT_COMM_EST");
	CHECK(ev.element.qp == p.b.qp);
	ibv_ack_async_event(&ev);
	ibv_close_device(p.ctx);
}

/* Connected to `bad` (an endpoint that never answers): RETRY_EXC_ERR after retry_cnt
 * retransmissions of 4.096 us * 2^8 each, later requests flushed. */
static void expect_retry_exc(struct pair *p, double min_ms)
{
	fill(p->a.buf, 100, 92);
	double t0 = now_ms();
	POST(p->a.qp, IBV_WR_RDMA_WRITE, 1, p->a.buf, 100, p->a.mr->lkey, (uintptr_t)p->b.buf,
	     p->b.mr->rkey, IBV_SEND_SIGNALED, 0);
	POST(p->a.qp, IBV_WR_RDMA_READ, 2, p->a.buf, 100, p->a.mr->lkey, (uintptr_t)p->b.buf,
	     p->b.mr->rkey, 0, 0);
	EXPECT_WC(p->a.scq, 1, IBV_WC_RETRY_EXC_ERR, 2000);
	double dt = now_ms() - t0;
	CHECKM(dt >= min_ms, "RETRY_EXC_ERR after %.2f ms, expected at least %.1f", dt, min_ms);
	EXPECT_WC(p->a.scq, 2, IBV_WC_WR_FLUSH_ERR, 2000);
	EQ(query_state(p->a.qp), IBV_QPS_ERR);
	POST(p->a.qp, IBV_WR_SEND, 3, p->a.buf, 10, p->a.mr->lkey, 0, 0, 0, 0);
	EXPECT_WC(p->a.scq, 3, IBV_WC_WR_FLUSH_ERR, 2000);
}

static void bad_pair(struct pair *p, const char *dev, int retry)
{
	struct pcfg c = pc(64 * KiB);
	c.connect = 0;
	struct qpo o = dflt();
	o.timeout = 8; /* 1.05 ms */
	o.retry_cnt = (uint8_t)retry;
	pair_init2(p, NULL, dev, &c, &o, &o);
}

static void t_to_dead_qpn(const void *arg)
{
	struct pair p;
	for (int retry = 0; retry <= 2; retry += 2) {
		bad_pair(&p, arg, retry);
		struct qpcfg q = qcfg();
		struct ibv_qp *gone = mk_qp(p.pd, p.a.scq, p.a.rcq, &q);
		struct ep e = p.b.ep;
		e.qpn = gone->qp_num;
		EQ_ERR(ibv_destroy_qp(gone), 0);
		connect_qp(p.a.qp, &e, p.a.ep.psn, &p.a.o);
		expect_retry_exc(&p, 1.05 * (retry + 1) * 0.9);
		ibv_close_device(p.ctx);
	}
}

static void t_to_destroyed_peer(const void *arg)
{
	struct pair p;
	bad_pair(&p, arg, 2);
	connect_qp(p.a.qp, &p.b.ep, p.a.ep.psn, &p.a.o);
	connect_qp(p.b.qp, &p.a.ep, p.b.ep.psn, &p.b.o);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 9, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 9, IBV_WC_SUCCESS, 2000);
	EQ_ERR(ibv_destroy_qp(p.b.qp), 0);
	expect_retry_exc(&p, 2.5);
	ibv_close_device(p.ctx);
}

/* The destination QP is connected to another QP: it drops what A sends. */
static void t_to_other_peer(const void *arg)
{
	struct pair p;
	bad_pair(&p, arg, 2);
	struct qpcfg q = qcfg();
	struct ibv_qp *third = mk_qp(p.pd, p.a.scq, p.a.rcq, &q);
	struct ep te = mk_ep(p.ctx, third, 0x55, p.a.o.gid_index);
	connect_qp(p.a.qp, &p.b.ep, p.a.ep.psn, &p.a.o);
	connect_qp(p.b.qp, &te, p.b.ep.psn, &p.b.o);
	expect_retry_exc(&p, 2.5);
	EQ(query_state(p.b.qp), IBV_QPS_RTS);
	ibv_close_device(p.ctx);
}

/* An address vector that does not lead to the destination (or not back): dropped. */
static void t_to_bad_address(const void *arg)
{
	struct pair p;
	/* A's AV names the wrong port */
	bad_pair(&p, arg, 2);
	struct ep e = p.b.ep;
	if (p.eth)
		e.gid.raw[15] ^= 0x5a;
	else
		e.lid = 0x99;
	connect_qp(p.a.qp, &e, p.a.ep.psn, &p.a.o);
	connect_qp(p.b.qp, &p.a.ep, p.b.ep.psn, &p.b.o);
	expect_retry_exc(&p, 2.5);
	ibv_close_device(p.ctx);
	/* B's AV does not lead back to A */
	bad_pair(&p, arg, 2);
	e = p.a.ep;
	if (p.eth)
		e.gid.raw[8] ^= 0x11;
	else
		e.lid = 0x77;
	connect_qp(p.a.qp, &p.b.ep, p.a.ep.psn, &p.a.o);
	connect_qp(p.b.qp, &e, p.b.ep.psn, &p.b.o);
	expect_retry_exc(&p, 2.5);
	ibv_close_device(p.ctx);
	if (!p.eth)
		return;
	/* RoCE: A sends as RoCE v1 (GID index 0), B expects v2 (index 1) */
	bad_pair(&p, arg, 2);
	struct qpo o1 = p.a.o;
	o1.gid_index = 0;
	connect_qp(p.a.qp, &p.b.ep, p.a.ep.psn, &o1);
	connect_qp(p.b.qp, &p.a.ep, p.b.ep.psn, &p.b.o);
	expect_retry_exc(&p, 2.5);
	ibv_close_device(p.ctx);
}

/* A peer process that dies with WRITEs and READs outstanding: RETRY_EXC_ERR, the rest
 * flushed, no hang. The peer is stopped first so that nothing can complete. */
static void kill_peer_fn(int fd, const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *cq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
	struct qpcfg q = qcfg();
	struct ibv_qp *qp = mk_qp(pd, cq, cq, &q);
	uint8_t *buf = xmap(MiB);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, MiB, ALL_ACCESS);
	CHECK(mr);
	struct qpo o = dflt();
	struct xinfo me = {mk_ep(ctx, qp, 0x4242, o.gid_index), (uintptr_t)buf, MiB, mr->rkey, 0},
		     them;
	msg_send(fd, &me, sizeof me);
	msg_recv(fd, &them, sizeof them, 5000);
	connect_qp(qp, &them.ep, me.ep.psn, &o);
	msg_send_u32(fd, 1);
	for (;;)
		pause();
}

static void t_xproc_kill(const void *arg)
{
	struct peer pr = spawn_peer(kill_peer_fn, arg);
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *cq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
	struct qpcfg q = qcfg();
	struct ibv_qp *qp = mk_qp(pd, cq, cq, &q);
	uint8_t *buf = xmap(MiB);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, MiB, ALL_ACCESS);
	struct qpo o = dflt();
	o.timeout = 10; /* 4.2 ms */
	o.retry_cnt = 2;
	struct xinfo me = {mk_ep(ctx, qp, 0x1212, o.gid_index), (uintptr_t)buf, MiB, mr->rkey, 0},
		     them;
	msg_recv(pr.fd, &them, sizeof them, 5000);
	msg_send(pr.fd, &me, sizeof me);
	connect_qp(qp, &them.ep, me.ep.psn, &o);
	EQ(msg_recv_u32(pr.fd, 5000), 1);
	/* one round trip while it lives */
	POST(qp, IBV_WR_RDMA_WRITE, 1, buf, 4096, mr->lkey, them.addr, them.rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(cq, 1, IBV_WC_SUCCESS, 5000);
	CHECK(kill(pr.pid, SIGSTOP) == 0);
	nap_us(5000);
	POST(qp, IBV_WR_RDMA_WRITE, 2, buf, 64 * KiB, mr->lkey, them.addr, them.rkey,
	     IBV_SEND_SIGNALED, 0);
	POST(qp, IBV_WR_RDMA_READ, 3, buf + 64 * KiB, 64 * KiB, mr->lkey, them.addr, them.rkey,
	     IBV_SEND_SIGNALED, 0);
	POST(qp, IBV_WR_RDMA_WRITE, 4, buf, 64 * KiB, mr->lkey, them.addr, them.rkey, 0, 0);
	POST(qp, IBV_WR_RDMA_READ, 5, buf + 64 * KiB, 64 * KiB, mr->lkey, them.addr, them.rkey,
	     IBV_SEND_SIGNALED, 0);
	expect_none(cq, 30, "a request to a stopped peer");
	CHECK(kill(pr.pid, SIGKILL) == 0);
	int st;
	CHECK(waitpid(pr.pid, &st, 0) == pr.pid);
	for (int i = 0; i < g_npeers; i++)
		if (g_peers[i] == pr.pid)
			g_peers[i] = 0;
	double t0 = now_ms();
	EXPECT_WC(cq, 2, IBV_WC_RETRY_EXC_ERR, 3000);
	CHECKM(now_ms() - t0 < 2000, "RETRY_EXC_ERR took %.0f ms", now_ms() - t0);
	EXPECT_WC(cq, 3, IBV_WC_WR_FLUSH_ERR, 1000);
	EXPECT_WC(cq, 4, IBV_WC_WR_FLUSH_ERR, 1000);
	EXPECT_WC(cq, 5, IBV_WC_WR_FLUSH_ERR, 1000);
	POST(qp, IBV_WR_RDMA_READ, 6, buf, 100, mr->lkey, them.addr, them.rkey, 0, 0);
	EXPECT_WC(cq, 6, IBV_WC_WR_FLUSH_ERR, 1000);
	EQ(query_state(qp), IBV_QPS_ERR);
	close(pr.fd);
	ibv_close_device(ctx);
}

/* ================================================================== 12. fault knobs */
static void t_fault_qp_error(const void *arg)
{
	const char *v = getenv("SOFTRDMA_FAULTS");
	CHECKM(v && !strcmp(v, "qp_error_after=2"), "needs SOFTRDMA_FAULTS=qp_error_after=2");
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	for (int i = 1; i <= 2; i++) {
		POST(p.a.qp, IBV_WR_RDMA_WRITE, (uint64_t)i, p.a.buf, 100, p.a.mr->lkey,
		     (uintptr_t)p.b.buf, p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
		EXPECT_WC(p.a.scq, i, IBV_WC_SUCCESS, 2000);
	}
	RECV(p.a.qp, 9, p.a.buf, 100, p.a.mr->lkey);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 3, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, 0, 0);
	POST(p.a.qp, IBV_WR_SEND, 4, p.a.buf, 100, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 3, IBV_WC_WR_FLUSH_ERR, 2000);
	EXPECT_WC(p.a.scq, 4, IBV_WC_WR_FLUSH_ERR, 2000);
	EXPECT_WC(p.a.rcq, 9, IBV_WC_WR_FLUSH_ERR, 2000);
	struct ibv_async_event ev;
	CHECKM(get_async(p.ctx, IBV_EVENT_QP_FATAL, &ev, 2000), "no IBV_EVENT_QP_FATAL");
	CHECK(ev.element.qp == p.a.qp);
	ibv_ack_async_event(&ev);
	EQ(query_state(p.a.qp), IBV_QPS_ERR);
	EQ(query_state(p.b.qp), IBV_QPS_RTS);
	ibv_close_device(p.ctx);
}

static void t_fault_drop(const void *arg)
{
	const char *v = getenv("SOFTRDMA_FAULTS");
	CHECKM(v && !strcmp(v, "drop_after=2"), "needs SOFTRDMA_FAULTS=drop_after=2");
	struct pair p;
	bad_pair(&p, arg, 2);
	connect_qp(p.a.qp, &p.b.ep, p.a.ep.psn, &p.a.o);
	connect_qp(p.b.qp, &p.a.ep, p.b.ep.psn, &p.b.o);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 7, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	POST(p.a.qp, IBV_WR_RDMA_READ, 8, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 7, IBV_WC_SUCCESS, 2000);
	EXPECT_WC(p.a.scq, 8, IBV_WC_SUCCESS, 2000);
	expect_retry_exc(&p, 2.5);
	ibv_close_device(p.ctx);
}

/* ================================================================== 13. CQ overrun */
static void t_cq_overrun(const void *arg)
{
	/* the library warns on stderr, as for every overrun: capture it */
	char errpath[] = "/tmp/softrdma-overrun.XXXXXX";
	int efd = mkstemp(errpath);
	CHECK(efd >= 0);
	unlink(errpath);
	int saved = dup(2);
	dup2(efd, 2);
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *small = ibv_create_cq(ctx, 2, NULL, NULL, 0);
	struct ibv_cq *big = ibv_create_cq(ctx, 64, NULL, NULL, 0);
	CHECK(small && big);
	struct qpcfg q = qcfg();
	struct ibv_qp *a = mk_qp(pd, small, big, &q), *b = mk_qp(pd, big, big, &q);
	uint8_t *buf = xmap(64 * KiB);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, 64 * KiB, ALL_ACCESS);
	struct qpo o = dflt();
	struct ep ea = mk_ep(ctx, a, 1, o.gid_index), eb = mk_ep(ctx, b, 2, o.gid_index);
	connect_qp(a, &eb, ea.psn, &o);
	connect_qp(b, &ea, eb.psn, &o);
	for (int i = 0; i < 8; i++)
		POST(a, IBV_WR_RDMA_WRITE, (uint64_t)i, buf, 100, mr->lkey, (uintptr_t)buf + 4096,
		     mr->rkey, IBV_SEND_SIGNALED, 0);
	struct ibv_async_event ev;
	CHECKM(get_async(ctx, IBV_EVENT_CQ_ERR, &ev, 2000), "no IBV_EVENT_CQ_ERR");
	CHECK(ev.element.cq == small);
	ibv_ack_async_event(&ev);
	CHECKM(get_async(ctx, IBV_EVENT_QP_FATAL, &ev, 2000),
	       "no IBV_EVENT_QP_FATAL for the overrun CQ's queue pair");
	CHECK(ev.element.qp == a);
	ibv_ack_async_event(&ev);
	EQ(query_state(a), IBV_QPS_ERR);
	EQ_ERR(ibv_destroy_qp(a), 0);
	EQ_ERR(ibv_destroy_cq(small), 0);
	ibv_close_device(ctx);
	dup2(saved, 2);
	char text[512] = "";
	ssize_t n = pread(efd, text, sizeof text - 1, 0);
	close(efd);
	CHECKM(n > 0 && strstr(text, "overrun"), "no overrun warning on stderr");
}

/* ================================================================== 14. tracing */
static void t_trace(const void *arg)
{
	const char *path = getenv("SOFTRDMA_TRACE_FILE");
	CHECKM(path && getenv("SOFTRDMA_TRACE"), "needs SOFTRDMA_TRACE=1 and SOFTRDMA_TRACE_FILE");
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 100, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 2000);
	ibv_close_device(p.ctx);
	FILE *f = fopen(path, "r");
	CHECKM(f, "%s: %s", path, strerror(errno));
	static char text[1 << 20];
	size_t n = fread(text, 1, sizeof text - 1, f);
	fclose(f);
	text[n] = 0;
	static const char *const want[] = {"ibv_post_send", "ibv_create_qp", "ibv_modify_qp",
					   "ibv_reg_mr", "ibv_poll_cq", "ibv_open_device"};
	for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
		CHECKM(strstr(text, want[i]), "the trace (%zu bytes) does not mention %s", n, want[i]);
	/* level 2 adds the NIC's own events (a responder's view of a connection) */
	int level2 = !strcmp(getenv("SOFTRDMA_TRACE"), "2");
	const char *nic = strstr(text, ": connection from qpn");
	CHECKM(level2 ? nic != NULL : nic == NULL, "SOFTRDMA_TRACE=%s %s NIC events", level2 ? "2" : "1",
	       level2 ? "does not log" : "logs");
}

/* ================================================================== across processes */
/* The peer: a target for WRITE / READ / SEND / atomics, then a requester itself. */
#define XP_LEN (3 * MiB)
#define XP_ATOMIC (2 * MiB + 128 * KiB)
static void xdata_peer(int fd, const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *scq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
	struct ibv_cq *rcq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
	struct qpcfg q = qcfg();
	struct ibv_qp *qp = mk_qp(pd, scq, rcq, &q);
	uint8_t *buf = xmap(XP_LEN);
	fill(buf + MiB, MiB, 77);
	*(uint64_t *)(buf + XP_ATOMIC) = 100;
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, XP_LEN, ALL_ACCESS);
	CHECK(mr);
	struct qpo o = dflt();
	struct xinfo me = {mk_ep(ctx, qp, 0x5151, o.gid_index), (uintptr_t)buf, XP_LEN, mr->rkey, 0},
		     them;
	msg_send(fd, &me, sizeof me);
	msg_recv(fd, &them, sizeof them, 5000);
	connect_qp(qp, &them.ep, me.ep.psn, &o);
	RECV(qp, 61, buf + 2 * MiB, 64 * KiB, mr->lkey);
	msg_send_u32(fd, 1); /* ready */
	EQ(msg_recv_u32(fd, 10000), 2); /* the parent is done with us */
	CHECK_FILL(buf, 300001, 5);
	CHECK(buf[300001] == 0);
	struct ibv_wc wc = EXPECT_WC(rcq, 61, IBV_WC_SUCCESS, 2000);
	EQ(wc.byte_len, 5000);
	EQ(wc.imm_data, htonl(0x01020304));
	EQ(wc.src_qp, them.ep.qpn);
	CHECK_FILL(buf + 2 * MiB, 5000, 9);
	EQ(*(uint64_t *)(buf + XP_ATOMIC), 5);
	/* now the other way round */
	fill(buf, 12345, 11);
	POST(qp, IBV_WR_RDMA_WRITE_WITH_IMM, 62, buf, 12345, mr->lkey, them.addr + 1000, them.rkey,
	     IBV_SEND_SIGNALED, htonl(0xabcd));
	EXPECT_WC(scq, 62, IBV_WC_SUCCESS, 5000);
	uint8_t *rd = buf + 2 * MiB + 256 * KiB;
	POST(qp, IBV_WR_RDMA_READ, 63, rd, 200000, mr->lkey, them.addr + 100000, them.rkey,
	     IBV_SEND_SIGNALED, 0);
	EXPECT_WC(scq, 63, IBV_WC_SUCCESS, 5000);
	CHECK_FILL(rd, 200000, 12);
	msg_send_u32(fd, 3);
	EQ(msg_recv_u32(fd, 10000), 4);
	EQ_ERR(ibv_destroy_qp(qp), 0);
	EQ_ERR(ibv_dereg_mr(mr), 0);
	ibv_close_device(ctx);
}

static void t_xproc_data(const void *arg)
{
	struct peer pr = spawn_peer(xdata_peer, arg);
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *scq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
	struct ibv_cq *rcq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
	struct qpcfg q = qcfg();
	struct ibv_qp *qp = mk_qp(pd, scq, rcq, &q);
	uint8_t *buf = xmap(2 * MiB);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, 2 * MiB, ALL_ACCESS);
	CHECK(mr);
	struct qpo o = dflt();
	struct xinfo me = {mk_ep(ctx, qp, 0x6161, o.gid_index), (uintptr_t)buf, 2 * MiB, mr->rkey, 0},
		     them;
	msg_recv(pr.fd, &them, sizeof them, 5000);
	msg_send(pr.fd, &me, sizeof me);
	connect_qp(qp, &them.ep, me.ep.psn, &o);
	EQ(msg_recv_u32(pr.fd, 5000), 1);
	fill(buf, 300001, 5);
	POST(qp, IBV_WR_RDMA_WRITE, 1, buf, 300001, mr->lkey, them.addr, them.rkey,
	     IBV_SEND_SIGNALED, 0);
	EXPECT_WC(scq, 1, IBV_WC_SUCCESS, 5000);
	memset(buf + MiB, 0, MiB);
	POST(qp, IBV_WR_RDMA_READ, 2, buf + MiB, MiB, mr->lkey, them.addr + MiB, them.rkey,
	     IBV_SEND_SIGNALED, 0);
	struct ibv_wc wc = EXPECT_WC(scq, 2, IBV_WC_SUCCESS, 5000);
	EQ(wc.byte_len, MiB);
	CHECK_FILL(buf + MiB, MiB, 77);
	fill(buf, 5000, 9);
	POST(qp, IBV_WR_SEND_WITH_IMM, 3, buf, 5000, mr->lkey, 0, 0, IBV_SEND_SIGNALED,
	     htonl(0x01020304));
	EXPECT_WC(scq, 3, IBV_WC_SUCCESS, 5000);
	uint64_t *res = (uint64_t *)(buf + 8192);
	EQ_ERR(post_atomic(qp, IBV_WR_ATOMIC_FETCH_AND_ADD, 4, res, mr->lkey,
			   them.addr + XP_ATOMIC, them.rkey, 23, 0),
	       0);
	EXPECT_WC(scq, 4, IBV_WC_SUCCESS, 5000);
	EQ(*res, 100);
	EQ_ERR(post_atomic(qp, IBV_WR_ATOMIC_CMP_AND_SWP, 5, res, mr->lkey, them.addr + XP_ATOMIC,
			   them.rkey, 123, 5),
	       0);
	EXPECT_WC(scq, 5, IBV_WC_SUCCESS, 5000);
	EQ(*res, 123);
	/* the peer writes to us and reads from us */
	memset(buf, 0, 64 * KiB);
	fill(buf + 100000, 200000, 12);
	RECV(qp, 71, NULL, 0, 0);
	msg_send_u32(pr.fd, 2);
	EQ(msg_recv_u32(pr.fd, 10000), 3);
	wc = EXPECT_WC(rcq, 71, IBV_WC_SUCCESS, 2000);
	EQ(wc.opcode, IBV_WC_RECV_RDMA_WITH_IMM);
	EQ(wc.byte_len, 12345);
	EQ(wc.imm_data, htonl(0xabcd));
	EQ(wc.src_qp, them.ep.qpn);
	CHECK_FILL(buf + 1000, 12345, 11);
	msg_send_u32(pr.fd, 4);
	EQ(peer_wait(&pr, 5000), 0);
	ibv_close_device(ctx);
}

/* ================================================================== fork */
/* A child's copies of its parent's verbs objects are dead (EIO); it can open the device
 * afresh; the parent's objects keep working. */
static void fork_child_fn(int fd, const void *arg)
{
	const struct pair *pp = arg;
	struct pair p = *pp;
	NULL_ERRNO(ibv_alloc_pd(p.ctx), EIO);
	NULL_ERRNO(ibv_create_cq(p.ctx, 4, NULL, NULL, 0), EIO);
	NULL_ERRNO(ibv_create_comp_channel(p.ctx), EIO);
	NULL_ERRNO(ibv_reg_mr(p.pd, p.a.buf, 4096, 0), EIO);
	struct ibv_device_attr da;
	EQ_ERR(ibv_query_device(p.ctx, &da), EIO);
	struct ibv_qp_init_attr ia;
	memset(&ia, 0, sizeof ia);
	ia.send_cq = ia.recv_cq = p.a.scq;
	ia.qp_type = IBV_QPT_RC;
	NULL_ERRNO(ibv_create_qp(p.pd, &ia), EIO);
	EQ_ERR(post_wr(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 10, p.a.mr->lkey, (uintptr_t)p.b.buf,
		       p.b.mr->rkey, IBV_SEND_SIGNALED, 0),
	       EIO);
	EQ_ERR(post_recv_ret(p.b.qp, 1, p.b.buf, 10, p.b.mr->lkey), EIO);
	EQ_ERR(to_state(p.a.qp, IBV_QPS_ERR), EIO);
	EQ_ERR(ibv_destroy_qp(p.a.qp), EIO);
	struct ibv_wc wc;
	CHECK(ibv_poll_cq(p.a.scq, 1, &wc) < 0);
	EQ_ERR(ibv_req_notify_cq(p.a.scq, 0), EIO);
	struct ibv_qp_attr qa;
	struct ibv_qp_init_attr qia;
	EQ_ERR(ibv_query_qp(p.a.qp, &qa, IBV_QP_STATE, &qia), EIO);
	EQ_ERR(ibv_dereg_mr(p.a.mr), EIO);
	EQ_ERR(ibv_destroy_cq(p.b.rcq), EIO);
	EQ_ERR(ibv_dealloc_pd(p.pd), EIO);
	/* a device of its own works */
	struct pair mine;
	pair_init(&mine, "soft0", 64 * KiB);
	fill(mine.a.buf, 1000, 101);
	POST(mine.a.qp, IBV_WR_RDMA_WRITE, 1, mine.a.buf, 1000, mine.a.mr->lkey,
	     (uintptr_t)mine.b.buf, mine.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(mine.a.scq, 1, IBV_WC_SUCCESS, 2000);
	CHECK_FILL(mine.b.buf, 1000, 101);
	ibv_close_device(mine.ctx);
	EQ_ERR(ibv_close_device(p.ctx), 0);
	msg_send_u32(fd, 1);
}

static void t_fork_child(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 10, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 2000);
	struct peer pr = spawn_peer(fork_child_fn, &p);
	EQ(msg_recv_u32(pr.fd, 10000), 1);
	EQ(peer_wait(&pr, 5000), 0);
	fill(p.a.buf, 3000, 102);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 2, p.a.buf, 3000, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 2000);
	CHECK_FILL(p.b.buf, 3000, 102);
	ibv_close_device(p.ctx);
}

/* fork() while the NIC thread is busy moving data: every child can use the library
 * (no lock is inherited held). */
static void fork_busy_fn(int fd, const void *arg)
{
	(void)arg;
	alarm(5);
	struct ibv_context *ctx = open_dev("soft0");
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	uint8_t *buf = xmap(8192);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, 8192, IBV_ACCESS_LOCAL_WRITE);
	CHECKM(mr, "ibv_reg_mr in the child: %s", strerror(errno));
	struct ibv_cq *cq = ibv_create_cq(ctx, 4, NULL, NULL, 0);
	struct qpcfg q = qcfg();
	struct ibv_qp *qp = mk_qp(pd, cq, cq, &q);
	EQ_ERR(ibv_destroy_qp(qp), 0);
	EQ_ERR(ibv_dereg_mr(mr), 0);
	ibv_close_device(ctx);
	msg_send_u32(fd, 1);
}

static void t_fork_busy(const void *arg)
{
	struct pair p;
	pair_init(&p, arg, 2 * MiB);
	int posted = 0, done = 0;
	for (int round = 0; round < 30; round++) {
		while (posted - done < 6) {
			POST(p.a.qp, posted % 2 ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE, (uint64_t)posted,
			     p.a.buf + (size_t)(posted % 4) * 512 * KiB, 512 * KiB, p.a.mr->lkey,
			     (uintptr_t)p.b.buf + (uint64_t)(posted % 4) * 512 * KiB, p.b.mr->rkey,
			     IBV_SEND_SIGNALED, 0);
			posted++;
		}
		nap_us((useconds_t)(round * 37 % 500));
		struct peer pr = spawn_peer(fork_busy_fn, NULL);
		EQ(msg_recv_u32(pr.fd, 6000), 1);
		EQ(peer_wait(&pr, 6000), 0);
		struct ibv_wc wc[8];
		int n = ibv_poll_cq(p.a.scq, 8, wc);
		for (int i = 0; i < n; i++) {
			EQ_ST(wc[i], IBV_WC_SUCCESS);
			EQ(wc[i].wr_id, done);
			done++;
		}
	}
	while (done < posted) {
		struct ibv_wc wc = wait_wc(p.a.scq, 10000, "the busy traffic");
		EQ_ST(wc, IBV_WC_SUCCESS);
		done++;
	}
	ibv_close_device(p.ctx);
}

/* ================================================================== more promises */
/* What is not emulated fails as on a device without the feature. */
static void t_unsupported(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *cq = ibv_create_cq(ctx, 16, NULL, NULL, 0);
	struct ibv_srq_init_attr sa;
	memset(&sa, 0, sizeof sa);
	sa.attr.max_wr = 4;
	sa.attr.max_sge = 1;
	NULL_ERRNO(ibv_create_srq(pd, &sa), EOPNOTSUPP);
	struct ibv_ah_attr ah;
	memset(&ah, 0, sizeof ah);
	ah.port_num = 1;
	NULL_ERRNO(ibv_create_ah(pd, &ah), EOPNOTSUPP);
	NULL_ERRNO(ibv_alloc_mw(pd, IBV_MW_TYPE_1), EOPNOTSUPP);
	NULL_ERRNO(ibv_reg_dmabuf_mr(pd, 0, 4096, 0, 3, 0), EOPNOTSUPP);
	struct ibv_cq_init_attr_ex cx;
	memset(&cx, 0, sizeof cx);
	cx.cqe = 4;
	NULL_ERRNO(ibv_create_cq_ex(ctx, &cx), EOPNOTSUPP);
	uint8_t *buf = xmap(4096);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, 4096, IBV_ACCESS_LOCAL_WRITE);
	errno = 0;
	CHECK(ibv_rereg_mr(mr, IBV_REREG_MR_CHANGE_ACCESS, NULL, NULL, 0, 0) != 0);
	struct ibv_qp_init_attr_ex qx;
	memset(&qx, 0, sizeof qx);
	qx.send_cq = qx.recv_cq = cq;
	qx.qp_type = IBV_QPT_RC;
	qx.cap.max_send_wr = qx.cap.max_recv_wr = 4;
	qx.cap.max_send_sge = qx.cap.max_recv_sge = 1;
	qx.pd = pd;
	qx.comp_mask = IBV_QP_INIT_ATTR_PD;
	struct ibv_qp *qp = ibv_create_qp_ex(ctx, &qx);
	CHECKM(qp, "ibv_create_qp_ex with a PD only: %s", strerror(errno));
	EQ_ERR(ibv_destroy_qp(qp), 0);
	qx.comp_mask = IBV_QP_INIT_ATTR_PD | IBV_QP_INIT_ATTR_SEND_OPS_FLAGS;
	qx.send_ops_flags = IBV_QP_EX_WITH_RDMA_WRITE;
	NULL_ERRNO(ibv_create_qp_ex(ctx, &qx), EOPNOTSUPP);
	union ibv_gid g;
	memset(&g, 0, sizeof g);
	qp = ibv_create_qp(pd, &(struct ibv_qp_init_attr){.send_cq = cq, .recv_cq = cq,
							   .qp_type = IBV_QPT_RC,
							   .cap = {4, 4, 1, 1, 0}});
	CHECK(qp);
	EQ_ERR(ibv_attach_mcast(qp, &g, 0), EOPNOTSUPP);
	CHECK(ibv_qp_to_qp_ex(qp) == NULL);
	NULL_ERRNO(ibv_import_device(ctx->cmd_fd), EOPNOTSUPP);
	ibv_close_device(ctx);
}

/* ibv_destroy_cq waits until every event it handed out is acknowledged, and
 * ibv_destroy_qp likewise for async events, as the real library does. */
struct destroy_arg {
	int (*fn)(void *);
	void *obj;
	volatile int done;
	int rc;
};
static void *destroy_thread(void *p)
{
	struct destroy_arg *d = p;
	d->rc = d->fn(d->obj);
	__atomic_store_n(&d->done, 1, __ATOMIC_SEQ_CST);
	return NULL;
}
static int destroy_cq_fn(void *o) { return ibv_destroy_cq(o); }
static int destroy_qp_fn(void *o) { return ibv_destroy_qp(o); }

static void t_destroy_waits(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
	struct pcfg c = pc(64 * KiB);
	c.ch_b = ch;
	struct qpo o = dflt();
	struct pair p;
	pair_init2(&p, ctx, NULL, &c, &o, &o);
	EQ_ERR(ibv_req_notify_cq(p.b.rcq, 0), 0);
	RECV(p.b.qp, 1, p.b.buf, 100, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	CHECK(fd_readable(ch->fd, 5000));
	struct ibv_cq *ecq;
	void *ectx;
	EQ(ibv_get_cq_event(ch, &ecq, &ectx), 0);
	/* B's QP gets an async event (COMM_EST is not raised in RTS; use an error) */
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 2, p.a.buf, 10, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey + 0x10000000u, IBV_SEND_SIGNALED, 0);
	struct ibv_async_event ev;
	CHECK(get_async(ctx, IBV_EVENT_QP_ACCESS_ERR, &ev, 2000));
	CHECK(ev.element.qp == p.b.qp);
	struct destroy_arg dq = {destroy_qp_fn, p.b.qp, 0, -1};
	pthread_t th;
	CHECK(pthread_create(&th, NULL, destroy_thread, &dq) == 0);
	nap_us(100000);
	CHECKM(!dq.done, "ibv_destroy_qp returned with an async event not acknowledged");
	ibv_ack_async_event(&ev);
	for (int i = 0; i < 2000 && !dq.done; i++)
		nap_us(1000);
	CHECKM(dq.done, "ibv_destroy_qp did not return once the event was acknowledged");
	pthread_join(th, NULL);
	EQ_ERR(dq.rc, 0);
	struct destroy_arg dc = {destroy_cq_fn, p.b.rcq, 0, -1};
	CHECK(pthread_create(&th, NULL, destroy_thread, &dc) == 0);
	nap_us(100000);
	CHECKM(!dc.done, "ibv_destroy_cq returned with a completion event not acknowledged");
	ibv_ack_cq_events(ecq, 1);
	for (int i = 0; i < 2000 && !dc.done; i++)
		nap_us(1000);
	CHECKM(dc.done, "ibv_destroy_cq did not return once the event was acknowledged");
	pthread_join(th, NULL);
	EQ_ERR(dc.rc, 0);
	EQ(ch->refcnt, 0);
	EQ_ERR(ibv_destroy_comp_channel(ch), 0);
	ibv_close_device(ctx);
}

/* CQ extras: resize; an error completion wakes a solicited-only arming. */
static void t_cq_more(const void *arg)
{
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
	struct pcfg c = pc(64 * KiB);
	c.ch_b = ch;
	c.cqe = 8;
	struct qpo o = dflt();
	struct pair p;
	pair_init2(&p, ctx, NULL, &c, &o, &o);
	for (int i = 0; i < 4; i++)
		POST(p.a.qp, IBV_WR_RDMA_WRITE, (uint64_t)i, p.a.buf, 10, p.a.mr->lkey,
		     (uintptr_t)p.b.buf, p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	nap_us(20000);
	EQ_ERR(ibv_resize_cq(p.a.scq, 2), EINVAL); /* four entries in it */
	EQ_ERR(ibv_resize_cq(p.a.scq, 100), 0);
	CHECK(p.a.scq->cqe >= 100);
	for (int i = 0; i < 4; i++)
		EXPECT_WC(p.a.scq, i, IBV_WC_SUCCESS, 1000);
	EQ_ERR(ibv_req_notify_cq(p.b.rcq, 1), 0);
	RECV(p.b.qp, 9, p.b.buf, 100, p.b.mr->lkey);
	EQ_ERR(to_state(p.b.qp, IBV_QPS_ERR), 0);
	CHECKM(fd_readable(ch->fd, 2000), "an error completion did not wake a solicited-only CQ");
	struct ibv_cq *ecq;
	void *ectx;
	EQ(ibv_get_cq_event(ch, &ecq, &ectx), 0);
	ibv_ack_cq_events(ecq, 1);
	EXPECT_WC(p.b.rcq, 9, IBV_WC_WR_FLUSH_ERR, 1000);
	ibv_close_device(ctx);
}

/* A QP with no send or receive queue, and inline data gathered from several SGEs. */
static void t_qp_edges(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(64 * KiB);
	c.q.inline_data = 128;
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	uint8_t in[100];
	fill(in, 100, 111);
	struct ibv_sge sg[3] = {{(uintptr_t)in, 30, 0}, {(uintptr_t)in + 30, 0, 0},
				{(uintptr_t)in + 30, 70, 0}};
	struct ibv_send_wr wr, *bad;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = 1;
	wr.opcode = IBV_WR_SEND;
	wr.sg_list = sg;
	wr.num_sge = 3;
	wr.send_flags = IBV_SEND_INLINE | IBV_SEND_SIGNALED;
	RECV(p.b.qp, 2, p.b.buf, 1000, p.b.mr->lkey);
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), 0);
	memset(in, 0, sizeof in);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 2000);
	struct ibv_wc wc = EXPECT_WC(p.b.rcq, 2, IBV_WC_SUCCESS, 2000);
	EQ(wc.byte_len, 100);
	CHECK_FILL(p.b.buf, 100, 111);
	/* no queues at all */
	struct qpcfg z = {0, 0, 0, 0, 0, 0};
	struct ibv_qp *qz = mk_qp(p.pd, p.a.scq, p.a.rcq, &z);
	connect_qp(qz, &p.b.ep, 1, &o);
	EQ_ERR(post_wr(qz, IBV_WR_RDMA_WRITE, 1, NULL, 0, 0, (uintptr_t)p.b.buf, p.b.mr->rkey, 0, 0),
	       ENOMEM);
	EQ_ERR(post_recv_ret(qz, 1, NULL, 0, 0), ENOMEM);
	EQ_ERR(to_state(qz, IBV_QPS_ERR), 0);
	EQ_ERR(to_state(qz, IBV_QPS_RESET), 0);
	EQ_ERR(ibv_destroy_qp(qz), 0);
	ibv_close_device(p.ctx);
}

/* A QP connected to itself (loopback on one QP). */
static void t_self_loop(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(64 * KiB);
	c.connect = 0;
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	connect_qp(p.a.qp, &p.a.ep, p.a.ep.psn, &o);
	fill(p.a.buf, 5000, 121);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 5000, p.a.mr->lkey, (uintptr_t)p.a.buf + 32768,
	     p.a.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_SUCCESS, 2000);
	CHECK_FILL(p.a.buf + 32768, 5000, 121);
	RECV(p.a.qp, 2, p.a.buf + 16384, 5000, p.a.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 3, p.a.buf, 5000, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 3, IBV_WC_SUCCESS, 2000);
	struct ibv_wc wc = EXPECT_WC(p.a.rcq, 2, IBV_WC_SUCCESS, 2000);
	EQ(wc.src_qp, p.a.qp->qp_num);
	CHECK_FILL(p.a.buf + 16384, 5000, 121);
	ibv_close_device(p.ctx);
}

/* Many connections at once in one process. */
static void t_many_qps(const void *arg)
{
	enum { N = 64 };
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *cq = ibv_create_cq(ctx, 4 * N, NULL, NULL, 0);
	uint8_t *buf = xmap(2 * N * 4096);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, 2 * N * 4096, ALL_ACCESS);
	struct qpcfg q = qcfg();
	struct qpo o = dflt();
	struct ibv_qp *qa[N], *qb[N];
	for (int i = 0; i < N; i++) {
		qa[i] = mk_qp(pd, cq, cq, &q);
		qb[i] = mk_qp(pd, cq, cq, &q);
		struct ep ea = mk_ep(ctx, qa[i], (uint32_t)i, o.gid_index),
			  eb = mk_ep(ctx, qb[i], (uint32_t)i * 3, o.gid_index);
		connect_qp(qa[i], &eb, ea.psn, &o);
		connect_qp(qb[i], &ea, eb.psn, &o);
	}
	for (int i = 0; i < N; i++) {
		fill(buf + (size_t)i * 4096, 4096, (unsigned)i);
		RECV(qb[i], 1000 + (uint64_t)i, buf + (size_t)(N + i) * 4096, 4096, mr->lkey);
		POST(qa[i], IBV_WR_SEND, (uint64_t)i, buf + (size_t)i * 4096, 4096, mr->lkey, 0, 0,
		     IBV_SEND_SIGNALED, 0);
	}
	int sends = 0, recvs = 0;
	for (int k = 0; k < 2 * N; k++) {
		struct ibv_wc wc = wait_wc(cq, 10000, "the 64 connections");
		EQ_ST(wc, IBV_WC_SUCCESS);
		if (wc.wr_id >= 1000) {
			int i = (int)wc.wr_id - 1000;
			EQ(wc.qp_num, qb[i]->qp_num);
			EQ(wc.src_qp, qa[i]->qp_num);
			CHECK_FILL(buf + (size_t)(N + i) * 4096, 4096, (unsigned)i);
			recvs++;
		} else {
			EQ(wc.qp_num, qa[wc.wr_id]->qp_num);
			sends++;
		}
	}
	EQ(sends, N);
	EQ(recvs, N);
	ibv_close_device(ctx);
}

/* Application threads posting and polling concurrently, each on its own pair. */
struct thr {
	struct pair *p;
	int idx;
	char err[128];
};
static void *thr_fn(void *a)
{
	struct thr *t = a;
	struct pair *p = t->p;
	const int n = 400;
	int done = 0;
	for (int i = 0; i < n; i++) {
		uint8_t *src = p->a.buf + (size_t)(i % 16) * 4096;
		if (post_wr(p->a.qp, i % 3 == 2 ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE, (uint64_t)i,
			    src, 4096, p->a.mr->lkey, (uintptr_t)p->b.buf + (uint64_t)(i % 16) * 4096,
			    p->b.mr->rkey, IBV_SEND_SIGNALED, 0)) {
			snprintf(t->err, sizeof t->err, "post %d failed", i);
			return NULL;
		}
		struct ibv_wc wc[8];
		int got = ibv_poll_cq(p->a.scq, 8, wc);
		for (int k = 0; k < got; k++, done++)
			if (wc[k].status != IBV_WC_SUCCESS || wc[k].wr_id != (uint64_t)done) {
				snprintf(t->err, sizeof t->err, "completion %d: wr_id %llu %s", done,
					 (unsigned long long)wc[k].wr_id, st_str(wc[k].status));
				return NULL;
			}
	}
	double end = now_ms() + 10000;
	while (done < n && now_ms() < end) {
		struct ibv_wc wc;
		if (ibv_poll_cq(p->a.scq, 1, &wc) == 1) {
			if (wc.status != IBV_WC_SUCCESS || wc.wr_id != (uint64_t)done) {
				snprintf(t->err, sizeof t->err, "completion %d: %s", done,
					 st_str(wc.status));
				return NULL;
			}
			done++;
		}
	}
	if (done < n)
		snprintf(t->err, sizeof t->err, "only %d of %d completions", done, n);
	return NULL;
}

static void t_threads(const void *arg)
{
	enum { T = 4 };
	struct ibv_context *ctx = open_dev(arg);
	struct pair p[T];
	struct thr t[T];
	pthread_t th[T];
	struct pcfg c = pc(64 * KiB);
	c.q.send_wr = 512;
	struct qpo o = dflt();
	for (int i = 0; i < T; i++) {
		pair_init2(&p[i], ctx, NULL, &c, &o, &o);
		t[i] = (struct thr){&p[i], i, ""};
	}
	for (int i = 0; i < T; i++)
		CHECK(pthread_create(&th[i], NULL, thr_fn, &t[i]) == 0);
	for (int i = 0; i < T; i++) {
		pthread_join(th[i], NULL);
		CHECKM(!t[i].err[0], "thread %d: %s", i, t[i].err);
	}
	ibv_close_device(ctx);
}

/* Initiator depth: with max_rd_atomic 2 / max_dest_rd_atomic 2, many READs and
 * atomics in a row all complete, in order. */
static void t_rd_atomic_depth(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(1 * MiB);
	struct qpo o = dflt();
	o.max_rd_atomic = 2;
	o.max_dest_rd_atomic = 2;
	pair_init2(&p, NULL, arg, &c, &o, &o);
	fill(p.b.buf, 512 * KiB, 131);
	*(uint64_t *)(p.b.buf + 768 * KiB) = 0;
	for (int i = 0; i < 40; i++) {
		if (i % 4 == 3)
			EQ_ERR(post_atomic(p.a.qp, IBV_WR_ATOMIC_FETCH_AND_ADD, (uint64_t)i,
					   p.a.buf + 768 * KiB + 8 * (uint64_t)i, p.a.mr->lkey,
					   (uintptr_t)p.b.buf + 768 * KiB, p.b.mr->rkey, 1, 0),
			       0);
		else
			POST(p.a.qp, IBV_WR_RDMA_READ, (uint64_t)i, p.a.buf + 12 * KiB * (uint64_t)i,
			     12 * KiB, p.a.mr->lkey, (uintptr_t)p.b.buf + 12 * KiB * (uint64_t)i,
			     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	}
	for (int i = 0; i < 40; i++)
		EXPECT_WC(p.a.scq, i, IBV_WC_SUCCESS, 5000);
	for (int i = 0; i < 40; i++)
		if (i % 4 != 3)
			CHECK(!memcmp(p.a.buf + 12 * KiB * (size_t)i, p.b.buf + 12 * KiB * (size_t)i,
				      12 * KiB));
	EQ(*(uint64_t *)(p.b.buf + 768 * KiB), 10);
	ibv_close_device(p.ctx);
}

/* Registered memory that goes away: an error completion, never a hang or a crash; and
 * after ibv_dereg_mr returns no transfer touches the region. */
static void t_mem_gone(const void *arg)
{
	struct pair p;
	long page = sysconf(_SC_PAGESIZE);
	/* the WRITE's source is unmapped (still registered) */
	pair_init(&p, arg, 256 * KiB);
	CHECK(munmap(p.a.buf + 64 * KiB, (size_t)page) == 0);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 128 * KiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_LOC_PROT_ERR, 3000);
	ibv_close_device(p.ctx);
	/* the READ's destination is unmapped */
	pair_init(&p, arg, 256 * KiB);
	CHECK(munmap(p.a.buf + 64 * KiB, (size_t)page) == 0);
	POST(p.a.qp, IBV_WR_RDMA_READ, 1, p.a.buf, 128 * KiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_LOC_PROT_ERR, 3000);
	ibv_close_device(p.ctx);
	/* the WRITE's target is unmapped on the responder */
	pair_init(&p, arg, 256 * KiB);
	CHECK(munmap(p.b.buf + 64 * KiB, (size_t)page) == 0);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 128 * KiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_REM_ACCESS_ERR, 3000);
	ibv_close_device(p.ctx);
	/* the receive buffer of a SEND is unmapped */
	pair_init(&p, arg, 256 * KiB);
	CHECK(munmap(p.b.buf + 64 * KiB, (size_t)page) == 0);
	RECV(p.b.qp, 5, p.b.buf, 128 * KiB, p.b.mr->lkey);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 128 * KiB, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.b.rcq, 5, IBV_WC_LOC_PROT_ERR, 3000);
	EXPECT_WC(p.a.scq, 1, IBV_WC_REM_OP_ERR, 3000);
	ibv_close_device(p.ctx);
}

/* The target region is deregistered while a long WRITE is arriving: REM_ACCESS_ERR (or
 * it was all there already), and the region does not change after ibv_dereg_mr. */
static void t_mem_dereg(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(8 * MiB);
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	volatile uint8_t *b = p.b.buf;
	memset(p.a.buf, 0x3c, 8 * MiB);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 8 * MiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	double end = now_ms() + 5000;
	while (b[256 * KiB] != 0x3c)
		CHECKM(now_ms() < end, "the WRITE did not start arriving");
	EQ_ERR(ibv_dereg_mr(p.b.mr), 0);
	uint8_t *snap = malloc(8 * MiB);
	CHECK(snap);
	memcpy(snap, p.b.buf, 8 * MiB);
	struct ibv_wc wc = wait_wc(p.a.scq, 5000, "a WRITE into a region deregistered meanwhile");
	CHECKM(wc.status == IBV_WC_REM_ACCESS_ERR || wc.status == IBV_WC_SUCCESS, "status %s",
	       st_str(wc.status));
	nap_us(20000);
	CHECKM(!memcmp(snap, p.b.buf, 8 * MiB),
	       "the region changed after ibv_dereg_mr returned");
	free(snap);
	ibv_close_device(p.ctx);
}

/* QPs of different users cannot connect: a peer running as another user sees nothing
 * at our QPN. */
static void other_user_fn(int fd, const void *arg)
{
	struct ep them;
	msg_recv(fd, &them, sizeof them, 5000);
	CHECK(setgid(65534) == 0 && setuid(65534) == 0);
	struct pair p;
	struct pcfg c = pc(64 * KiB);
	c.connect = 0;
	struct qpo o = dflt();
	o.timeout = 8;
	o.retry_cnt = 1;
	pair_init2(&p, NULL, arg, &c, &o, &o);
	connect_qp(p.a.qp, &them, p.a.ep.psn, &o);
	POST(p.a.qp, IBV_WR_SEND, 1, p.a.buf, 10, p.a.mr->lkey, 0, 0, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 1, IBV_WC_RETRY_EXC_ERR, 3000);
	msg_send_u32(fd, 1);
}

static void t_other_user(const void *arg)
{
	if (geteuid() != 0)
		skip_test("needs root to run a peer as another user");
	struct pair p;
	pair_init(&p, arg, 64 * KiB);
	RECV(p.b.qp, 1, p.b.buf, 100, p.b.mr->lkey);
	struct peer pr = spawn_peer(other_user_fn, arg);
	msg_send(pr.fd, &p.b.ep, sizeof p.b.ep);
	EQ(msg_recv_u32(pr.fd, 5000), 1);
	EQ(peer_wait(&pr, 5000), 0);
	expect_none(p.b.rcq, 10, "a SEND from another user");
	ibv_close_device(p.ctx);
}

/* PSNs wrap at 2^24: messages of many packets across the wrap. */
static void t_psn_wrap(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(1 * MiB);
	c.connect = 0;
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	p.a.ep.psn = 0xfffff0;
	p.b.ep.psn = 0xffffe0;
	connect_qp(p.a.qp, &p.b.ep, p.a.ep.psn, &o);
	connect_qp(p.b.qp, &p.a.ep, p.b.ep.psn, &o);
	for (int i = 0; i < 20; i++)
		RECV(p.b.qp, 100 + (uint64_t)i, p.b.buf + 512 * KiB, 64 * KiB, p.b.mr->lkey);
	fill(p.a.buf, 256 * KiB, 141);
	for (int i = 0; i < 40; i++) {
		if (i % 2)
			POST(p.a.qp, IBV_WR_SEND, (uint64_t)i, p.a.buf, 64 * KiB, p.a.mr->lkey, 0, 0,
			     IBV_SEND_SIGNALED, 0);
		else
			POST(p.a.qp, i % 4 ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE, (uint64_t)i,
			     p.a.buf + 256 * KiB, 64 * KiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
			     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	}
	for (int i = 0; i < 40; i++)
		EXPECT_WC(p.a.scq, i, IBV_WC_SUCCESS, 5000);
	for (int i = 0; i < 20; i++)
		EXPECT_WC(p.b.rcq, 100 + i, IBV_WC_SUCCESS, 5000);
	struct ibv_qp_attr a;
	struct ibv_qp_init_attr ia;
	EQ_ERR(ibv_query_qp(p.a.qp, &a, IBV_QP_SQ_PSN, &ia), 0);
	CHECKM(a.sq_psn < 0xfffff0, "sq_psn %#x did not wrap", a.sq_psn);
	ibv_close_device(p.ctx);
}

/* SOFTRDMA_SEED makes keys and QPNs reproducible: the same seed, the same ones. */
static void print_keys(void)
{
	struct ibv_context *ctx = open_dev("soft0");
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *cq = ibv_create_cq(ctx, 4, NULL, NULL, 0);
	uint8_t *buf = xmap(8192);
	struct ibv_mr *m1 = ibv_reg_mr(pd, buf, 4096, 0), *m2 = ibv_reg_mr(pd, buf, 8192, 0);
	struct qpcfg q = qcfg();
	struct ibv_qp *qp = mk_qp(pd, cq, cq, &q);
	printf("%#x %#x %#x\n", m1->lkey, m2->lkey, qp->qp_num);
	fflush(stdout);
}

static void run_print_keys(const char *seed, char *out, size_t size)
{
	int pfd[2];
	CHECK(pipe(pfd) == 0);
	pid_t pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		dup2(pfd[1], 1);
		setenv("SOFTRDMA_SEED", seed, 1);
		char *args[] = {"conformance", "--print-keys", NULL};
		execv("/proc/self/exe", args);
		_exit(127);
	}
	close(pfd[1]);
	ssize_t n = 0, r;
	while (n < (ssize_t)size - 1 && (r = read(pfd[0], out + n, size - 1 - (size_t)n)) > 0)
		n += r;
	close(pfd[0]);
	out[n > 0 ? n : 0] = 0;
	int st;
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
	CHECKM(n > 0, "--print-keys printed nothing");
}

static void t_seed(const void *arg)
{
	(void)arg;
	char a[128], b[128], c[128];
	run_print_keys("42", a, sizeof a);
	run_print_keys("42", b, sizeof b);
	run_print_keys("43", c, sizeof c);
	CHECKM(!strcmp(a, b), "SOFTRDMA_SEED=42 twice: '%.40s' and '%.40s'", a, b);
	CHECKM(strcmp(a, c), "SOFTRDMA_SEED=42 and 43 gave the same keys and QPN: %.40s", a);
}

/* soft0's max_msg_sz is 1 GiB. Nothing is sent: the check comes first. */
static void t_msg_size_soft0(const void *arg)
{
	(void)arg;
	struct pair p;
	pair_init(&p, "soft0", 64 * KiB);
	size_t big = (size_t)1 << 30;
	uint8_t *m = mmap(NULL, big + 4096, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	CHECK(m != MAP_FAILED);
	struct ibv_mr *mr = ibv_reg_mr(p.pd, m, big + 4096, IBV_ACCESS_LOCAL_WRITE);
	if (!mr && errno == ENOMEM)
		need_memlock(big + 4096 + (1u << 20));
	CHECK(mr);
	POST(p.a.qp, IBV_WR_RDMA_READ, 1, m, (uint32_t)big + 1, mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	expect_local(&p, 1, IBV_WC_LOC_LEN_ERR);
}

/* 4096 QPs per device; the next one is refused with ENOMEM. */
static void t_qp_limit(const void *arg)
{
	struct rlimit rl;
	CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
	if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < 4096 + 256)
		skip_test("RLIMIT_NOFILE's hard limit %llu is below the 4352 descriptors 4096 QPs need",
			  (unsigned long long)rl.rlim_max);
	if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < 4096 + 256) {
		rl.rlim_cur = 4096 + 256;
		CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0);
	}
	struct ibv_context *ctx = open_dev(arg);
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	struct ibv_cq *cq = ibv_create_cq(ctx, 4, NULL, NULL, 0);
	struct qpcfg q = {1, 1, 1, 1, 0, 0};
	static struct ibv_qp *qps[4096];
	for (int i = 0; i < 4096; i++) {
		qps[i] = ibv_create_qp(pd, &(struct ibv_qp_init_attr){.send_cq = cq, .recv_cq = cq,
								      .qp_type = IBV_QPT_RC,
								      .cap = {1, 1, 1, 1, 0}});
		CHECKM(qps[i], "QP %d: %s", i, strerror(errno));
	}
	(void)q;
	NULL_ERRNO(ibv_create_qp(pd, &(struct ibv_qp_init_attr){.send_cq = cq, .recv_cq = cq,
								 .qp_type = IBV_QPT_RC,
								 .cap = {1, 1, 1, 1, 0}}),
		   ENOMEM);
	EQ_ERR(ibv_destroy_qp(qps[100]), 0);
	qps[100] = ibv_create_qp(pd, &(struct ibv_qp_init_attr){.send_cq = cq, .recv_cq = cq,
								 .qp_type = IBV_QPT_RC,
								 .cap = {1, 1, 1, 1, 0}});
	CHECKM(qps[100], "after one was destroyed: %s", strerror(errno));
	ibv_close_device(ctx);
}

/* ibv_query_gid_type@IBVERBS_PRIVATE_34, which ibv_devinfo calls. */
#include <dlfcn.h>
static void t_gid_type_private(const void *arg)
{
	(void)arg;
	int (*fn)(struct ibv_context *, uint8_t, unsigned int, int *) =
		(int (*)(struct ibv_context *, uint8_t, unsigned int, int *))dlvsym(
			RTLD_DEFAULT, "ibv_query_gid_type", "IBVERBS_PRIVATE_34");
	CHECKM(fn, "ibv_query_gid_type@IBVERBS_PRIVATE_34 is not exported");
	struct ibv_context *c1 = open_dev("soft1"), *c0 = open_dev("soft0");
	int t = -1;
	EQ(fn(c1, 1, 0, &t), 0);
	EQ(t, 0); /* IB/RoCE v1 */
	EQ(fn(c1, 1, 1, &t), 0);
	EQ(t, 1); /* RoCE v2 */
	EQ(fn(c0, 1, 0, &t), 0);
	EQ(t, 0);
	EQ(fn(c0, 1, 16, &t), -1);
	ibv_close_device(c0);
	ibv_close_device(c1);
}

/* 16 SGEs on both sides. */
static void t_max_sge(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(256 * KiB);
	c.q.send_sge = 16;
	c.q.recv_sge = 16;
	struct qpo o = dflt();
	pair_init2(&p, NULL, arg, &c, &o, &o);
	struct ibv_sge ss[16], rs[16];
	uint8_t *msg = p.a.buf + 200 * KiB;
	fill(msg, 16 * 1000, 151);
	size_t off = 0;
	for (int i = 0; i < 16; i++) {
		uint32_t len = 500 + 63 * (uint32_t)i; /* 500 .. 1445, 15560 in all */
		memcpy(p.a.buf + 8192 * (size_t)i, msg + off, len);
		ss[i] = (struct ibv_sge){(uintptr_t)p.a.buf + 8192 * (uint64_t)i, len, p.a.mr->lkey};
		rs[i] = (struct ibv_sge){(uintptr_t)p.b.buf + 8192 * (uint64_t)(15 - i), 1000,
					 p.b.mr->lkey};
		off += len;
	}
	struct ibv_recv_wr rwr = {.wr_id = 5, .sg_list = rs, .num_sge = 16}, *rbad;
	EQ_ERR(ibv_post_recv(p.b.qp, &rwr, &rbad), 0);
	struct ibv_send_wr wr, *bad;
	memset(&wr, 0, sizeof wr);
	wr.wr_id = 6;
	wr.opcode = IBV_WR_SEND;
	wr.sg_list = ss;
	wr.num_sge = 16;
	wr.send_flags = IBV_SEND_SIGNALED;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), 0);
	EXPECT_WC(p.a.scq, 6, IBV_WC_SUCCESS, 5000);
	struct ibv_wc wc = EXPECT_WC(p.b.rcq, 5, IBV_WC_SUCCESS, 5000);
	EQ(wc.byte_len, off);
	for (size_t i = 0, at = 0; i < 16 && at < off; i++, at += 1000) {
		size_t n = off - at < 1000 ? off - at : 1000;
		CHECKM(!memcmp(p.b.buf + 8192 * (15 - i), msg + at, n), "receive SGE %zu", i);
	}
	/* a 16-SGE READ and WRITE */
	fill(p.b.buf + 128 * KiB, 16 * 1000, 152);
	for (int i = 0; i < 16; i++)
		ss[i].length = 1000;
	wr.wr_id = 7;
	wr.opcode = IBV_WR_RDMA_READ;
	wr.wr.rdma.remote_addr = (uintptr_t)p.b.buf + 128 * KiB;
	wr.wr.rdma.rkey = p.b.mr->rkey;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), 0);
	EXPECT_WC(p.a.scq, 7, IBV_WC_SUCCESS, 5000);
	for (int i = 0; i < 16; i++)
		CHECK(!memcmp(p.a.buf + 8192 * (size_t)i, p.b.buf + 128 * KiB + 1000 * (size_t)i, 1000));
	wr.wr_id = 8;
	wr.opcode = IBV_WR_RDMA_WRITE;
	wr.wr.rdma.remote_addr = (uintptr_t)p.b.buf + 192 * KiB;
	EQ_ERR(ibv_post_send(p.a.qp, &wr, &bad), 0);
	EXPECT_WC(p.a.scq, 8, IBV_WC_SUCCESS, 5000);
	CHECK_FILL(p.b.buf + 192 * KiB, 16000, 152);
	ibv_close_device(p.ctx);
}

/* Destroying a QP, and deregistering a local region, while data moves. */
static void t_busy_teardown(const void *arg)
{
	struct pair p;
	struct pcfg c = pc(2 * MiB);
	struct qpo o = dflt();
	o.timeout = 10;
	o.retry_cnt = 2;
	/* the requester goes away mid-WRITE; the responder keeps working */
	pair_init2(&p, NULL, arg, &c, &o, &o);
	volatile uint8_t *b = p.b.buf;
	memset(p.a.buf, 0x4d, 2 * MiB);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 2 * MiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	double end = now_ms() + 5000;
	while (b[256 * KiB] != 0x4d)
		CHECKM(now_ms() < end, "the WRITE did not start arriving");
	uint32_t gone = p.a.qp->qp_num;
	EQ_ERR(ibv_destroy_qp(p.a.qp), 0);
	/* its completion may be in the CQ already (rxe keeps it, mlx5 cleans it out) */
	struct ibv_wc old;
	while (ibv_poll_cq(p.a.scq, 1, &old) == 1)
		CHECKM(old.qp_num == gone && old.wr_id == 1, "a stray completion: wr_id %llu",
		       (unsigned long long)old.wr_id);
	struct qpcfg q = qcfg();
	struct ibv_qp *a2 = mk_qp(p.pd, p.a.scq, p.a.rcq, &q);
	struct ep e2 = mk_ep(p.ctx, a2, 0x100, o.gid_index);
	EQ_ERR(to_state(p.b.qp, IBV_QPS_ERR), 0);
	EQ_ERR(to_state(p.b.qp, IBV_QPS_RESET), 0);
	connect_qp(a2, &p.b.ep, e2.psn, &o);
	connect_qp(p.b.qp, &e2, p.b.ep.psn, &o);
	fill(p.a.buf, 1000, 161);
	POST(a2, IBV_WR_RDMA_WRITE, 2, p.a.buf, 1000, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	EXPECT_WC(p.a.scq, 2, IBV_WC_SUCCESS, 5000);
	CHECK_FILL(p.b.buf, 1000, 161);
	ibv_close_device(p.ctx);
	/* the source region is deregistered mid-WRITE: LOC_PROT_ERR (or it was done) */
	pair_init2(&p, NULL, arg, &c, &o, &o);
	b = p.b.buf;
	memset(p.a.buf, 0x4e, 2 * MiB);
	POST(p.a.qp, IBV_WR_RDMA_WRITE, 1, p.a.buf, 2 * MiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	end = now_ms() + 5000;
	while (b[256 * KiB] != 0x4e)
		CHECKM(now_ms() < end, "the WRITE did not start arriving");
	EQ_ERR(ibv_dereg_mr(p.a.mr), 0);
	struct ibv_wc wc = wait_wc(p.a.scq, 5000, "a WRITE whose source was deregistered");
	CHECKM(wc.status == IBV_WC_LOC_PROT_ERR || wc.status == IBV_WC_SUCCESS, "status %s",
	       st_str(wc.status));
	ibv_close_device(p.ctx);
	/* the READ's destination region is deregistered mid-response */
	pair_init2(&p, NULL, arg, &c, &o, &o);
	volatile uint8_t *a = p.a.buf;
	memset(p.b.buf, 0x4f, 2 * MiB);
	POST(p.a.qp, IBV_WR_RDMA_READ, 1, p.a.buf, 2 * MiB, p.a.mr->lkey, (uintptr_t)p.b.buf,
	     p.b.mr->rkey, IBV_SEND_SIGNALED, 0);
	end = now_ms() + 5000;
	while (a[256 * KiB] != 0x4f)
		CHECKM(now_ms() < end, "the READ response did not start arriving");
	EQ_ERR(ibv_dereg_mr(p.a.mr), 0);
	uint8_t *snap = malloc(2 * MiB);
	CHECK(snap);
	memcpy(snap, p.a.buf, 2 * MiB);
	wc = wait_wc(p.a.scq, 5000, "a READ whose destination was deregistered");
	CHECKM(wc.status == IBV_WC_LOC_PROT_ERR || wc.status == IBV_WC_SUCCESS, "status %s",
	       st_str(wc.status));
	CHECKM(!memcmp(snap, p.a.buf, 2 * MiB), "the region changed after ibv_dereg_mr returned");
	free(snap);
	ibv_close_device(p.ctx);
}

/* ================================================================== the list */
#define D0 "soft0"
#define D1 "soft1"
static const struct test tests[] = {
	/* 1. devices */
	{"dev_list", t_dev_list, NULL, 10, NULL},
	{"query_device[soft0]", t_query_device, D0, 10, NULL},
	{"query_device[soft1]", t_query_device, D1, 10, NULL},
	{"query_port_compat[soft0]", t_query_port_compat, D0, 10, NULL},
	{"query_port_compat[soft1]", t_query_port_compat, D1, 10, NULL},
	{"query_port_ex[soft0]", t_query_port_ex, D0, 10, NULL},
	{"query_port_ex[soft1]", t_query_port_ex, D1, 10, NULL},
	{"query_gid", t_query_gid, NULL, 10, NULL},
	{"query_pkey[soft0]", t_query_pkey, D0, 10, NULL},
	{"query_pkey[soft1]", t_query_pkey, D1, 10, NULL},
	/* 2. PD and MR */
	{"mr_rules", t_mr_rules, D0, 10, NULL},
	{"mr_memlock", t_mr_memlock, NULL, 15, NULL},
	/* 3. destruction order */
	{"destroy_order", t_destroy_order, D0, 10, NULL},
	{"close_leftovers[soft0]", t_close_leftovers, D0, 10, NULL},
	{"close_leftovers[soft1]", t_close_leftovers, D1, 10, NULL},
	/* 4. CQs and channels */
	{"cq_bounds", t_cq_bounds, D0, 10, NULL},
	{"cq_events", t_cq_events, D0, 10, NULL},
	{"cq_solicited", t_cq_solicited, D1, 10, NULL},
	{"cq_destroyed_events", t_cq_destroyed_events, D0, 10, NULL},
	/* 5. QP state machine */
	{"qp_create", t_qp_create, D0, 10, NULL},
	{"qp_masks[soft0]", t_qp_masks, D0, 10, NULL},
	{"qp_masks[soft1]", t_qp_masks, D1, 10, NULL},
	{"qp_bad_transitions", t_qp_bad_transitions, D0, 10, NULL},
	{"qp_ranges[soft0]", t_qp_ranges, D0, 10, NULL},
	{"qp_ranges[soft1]", t_qp_ranges, D1, 10, NULL},
	{"qp_query[soft0]", t_qp_query, D0, 10, NULL},
	{"qp_query[soft1]", t_qp_query, D1, 10, NULL},
	{"qp_sqd", t_qp_sqd, D0, 10, NULL},
	/* 6. posting */
	{"post_state", t_post_state, D1, 10, NULL},
	{"post_limits", t_post_limits, D0, 10, NULL},
	{"post_chain", t_post_chain, D0, 10, NULL},
	/* 7. data path */
	{"write_read[soft0]", t_write_read, D0, 20, NULL},
	{"write_read[soft1]", t_write_read, D1, 20, NULL},
	{"write_imm[soft0]", t_write_imm, D0, 10, NULL},
	{"write_imm[soft1]", t_write_imm, D1, 10, NULL},
	{"send_recv[soft0]", t_send_recv, D0, 10, NULL},
	{"send_recv[soft1]", t_send_recv, D1, 10, NULL},
	{"atomics[soft0]", t_atomics, D0, 10, NULL},
	{"atomics[soft1]", t_atomics, D1, 10, NULL},
	{"unsignaled", t_unsignaled, D0, 10, NULL},
	{"order[soft0]", t_order, D0, 20, NULL},
	{"order[soft1]", t_order, D1, 20, NULL},
	{"burst", t_burst, D0, 25, NULL},
	{"iova", t_iova, D0, 10, NULL},
	{"xproc_data[soft0]", t_xproc_data, D0, 20, NULL},
	{"xproc_data[soft1]", t_xproc_data, D1, 20, NULL},
	/* 8. asynchronous completions */
	{"async_default", t_async_default, D0, 10, NULL},
	/* 9. errors */
	{"err_rkey[soft0]", t_err_rkey, D0, 10, NULL},
	{"err_rkey[soft1]", t_err_rkey, D1, 10, NULL},
	{"err_remote", t_err_remote, D0, 15, NULL},
	{"err_local", t_err_local, D1, 15, NULL},
	{"err_recv", t_err_recv, D0, 10, NULL},
	{"err_msg_size", t_err_msg_size, D1, 20, NULL},
	{"err_modify", t_err_modify, D0, 10, NULL},
	{"err_midmessage_send", t_err_midmessage_send, D0, 15, NULL},
	{"err_midmessage_read", t_err_midmessage_read, D0, 15, NULL},
	/* 10. receiver not ready */
	{"rnr_recover[soft0]", t_rnr_recover, D0, 10, NULL},
	{"rnr_recover[soft1]", t_rnr_recover, D1, 10, NULL},
	{"rnr_exceeded", t_rnr_exceeded, D0, 10, NULL},
	{"rnr_long_send[soft0]", t_rnr_long_send, D0, 15, NULL},
	{"rnr_long_send[soft1]", t_rnr_long_send, D1, 15, NULL},
	/* 11. timeouts and dead peers */
	{"to_late_rtr[soft0]", t_to_late_rtr, D0, 10, NULL},
	{"to_late_rtr[soft1]", t_to_late_rtr, D1, 10, NULL},
	{"to_dead_qpn", t_to_dead_qpn, D0, 10, NULL},
	{"to_destroyed_peer", t_to_destroyed_peer, D1, 10, NULL},
	{"to_other_peer", t_to_other_peer, D0, 10, NULL},
	{"to_bad_address[soft0]", t_to_bad_address, D0, 10, NULL},
	{"to_bad_address[soft1]", t_to_bad_address, D1, 10, NULL},
	{"xproc_kill[soft0]", t_xproc_kill, D0, 15, NULL},
	{"xproc_kill[soft1]", t_xproc_kill, D1, 15, NULL},
	/* 13. CQ overrun */
	{"cq_overrun", t_cq_overrun, D0, 10, NULL},
	/* more promises */
	{"unsupported", t_unsupported, D0, 10, NULL},
	{"destroy_waits", t_destroy_waits, D0, 10, NULL},
	{"cq_more", t_cq_more, D0, 10, NULL},
	{"qp_edges", t_qp_edges, D1, 10, NULL},
	{"self_loop[soft0]", t_self_loop, D0, 10, NULL},
	{"self_loop[soft1]", t_self_loop, D1, 10, NULL},
	{"many_qps", t_many_qps, D0, 15, NULL},
	{"threads", t_threads, D1, 20, NULL},
	{"rd_atomic_depth", t_rd_atomic_depth, D0, 10, NULL},
	{"mem_gone[soft0]", t_mem_gone, D0, 20, NULL},
	{"mem_gone[soft1]", t_mem_gone, D1, 20, NULL},
	{"mem_dereg[soft0]", t_mem_dereg, D0, 20, NULL},
	{"mem_dereg[soft1]", t_mem_dereg, D1, 20, NULL},
	{"other_user", t_other_user, D0, 10, NULL},
	{"psn_wrap[soft0]", t_psn_wrap, D0, 10, NULL},
	{"psn_wrap[soft1]", t_psn_wrap, D1, 10, NULL},
	{"seed", t_seed, NULL, 10, NULL},
	{"msg_size_soft0", t_msg_size_soft0, NULL, 10, NULL},
	{"qp_limit", t_qp_limit, D0, 20, NULL},
	{"gid_type_private", t_gid_type_private, NULL, 10, NULL},
	{"max_sge", t_max_sge, D1, 10, NULL},
	{"busy_teardown[soft0]", t_busy_teardown, D0, 15, NULL},
	{"busy_teardown[soft1]", t_busy_teardown, D1, 15, NULL},
	/* fork */
	{"fork_child", t_fork_child, D0, 15, NULL},
	{"fork_busy", t_fork_busy, D0, 30, NULL},
	/* environment groups */
	{"dev_none", t_dev_none, NULL, 10, "no-devices"},
	{"dev_custom", t_dev_custom, NULL, 10, "custom-devices"},
	{"port_down", t_port_down, NULL, 10, "port-down"},
	{"latency[soft0]", t_latency, D0, 20, "latency"},
	{"latency[soft1]", t_latency, D1, 20, "latency"},
	{"rnr_recover", t_rnr_recover, D0, 10, "latency"},
	{"to_late_rtr", t_to_late_rtr, D1, 10, "latency"},
	{"err_rkey", t_err_rkey, D0, 10, "latency"},
	{"write_read[soft0]", t_write_read, D0, 30, "segment"},
	{"write_read[soft1]", t_write_read, D1, 30, "segment"},
	{"send_recv", t_send_recv, D1, 10, "segment"},
	{"xproc_data", t_xproc_data, D0, 20, "segment"},
	{"fault_rnr_exceeded", t_fault_rnr_exceeded, D0, 10, "fault-rnr"},
	{"fault_rnr_recovers", t_fault_rnr_recovers, D1, 10, "fault-rnr"},
	{"fault_qp_error", t_fault_qp_error, D0, 10, "fault-qp-error"},
	{"fault_drop", t_fault_drop, D0, 10, "fault-drop"},
	{"trace", t_trace, D0, 10, "trace"},
	{"trace", t_trace, D1, 10, "trace2"},
};
#define NTESTS ((int)(sizeof tests / sizeof tests[0]))

static const struct envgroup {
	const char *name;
	const char *env[3]; /* NAME=VALUE; "@" as the value: a fresh temporary file */
} envgroups[] = {
	{"no-devices", {"SOFTRDMA_DEVICES="}},
	{"custom-devices", {"SOFTRDMA_DEVICES=a0:ib,b1:eth,c2:ib"}},
	{"port-down", {"SOFTRDMA_PORT_DOWN=soft1"}},
	{"latency", {"SOFTRDMA_LATENCY_US=2000-3000"}},
	{"segment", {"SOFTRDMA_SEGMENT=1000"}},
	{"fault-rnr", {"SOFTRDMA_FAULTS=rnr=3"}},
	{"fault-qp-error", {"SOFTRDMA_FAULTS=qp_error_after=2"}},
	{"fault-drop", {"SOFTRDMA_FAULTS=drop_after=2"}},
	{"trace", {"SOFTRDMA_TRACE=1", "SOFTRDMA_TRACE_FILE=@"}},
	{"trace2", {"SOFTRDMA_TRACE=2", "SOFTRDMA_TRACE_FILE=@"}},
};
#define NGROUPS ((int)(sizeof envgroups / sizeof envgroups[0]))

static int name_selected(const char *name, int argc, char **argv)
{
	if (argc <= 1)
		return 1;
	for (int i = 1; i < argc; i++)
		if (!strncmp(name, argv[i], strlen(argv[i])))
			return 1;
	return 0;
}

/* Run the tests of `group` (NULL: the default ones); counts into *pass / *fail. */
static void run_group(const char *group, int argc, char **argv, int *pass, int *fail,
		      int *skip)
{
	for (int i = 0; i < NTESTS; i++) {
		const struct test *t = &tests[i];
		if ((group == NULL) != (t->group == NULL))
			continue;
		if (group && strcmp(group, t->group))
			continue;
		if (!name_selected(t->name, argc, argv))
			continue;
		int r = run_test(t);
		if (r == 2)
			(*skip)++;
		else if (r)
			(*pass)++;
		else
			(*fail)++;
	}
}

/* Re-execute this binary for an environment group: the library reads its
 * configuration once, when it is loaded. */
static void run_envgroup(const struct envgroup *g, int *pass, int *fail, int *skip)
{
	char tmp[64] = "";
	int pfd[2];
	if (pipe(pfd)) {
		printf("FAIL [%s]: pipe: %s\n", g->name, strerror(errno));
		(*fail)++;
		return;
	}
	for (int i = 0; i < 3 && g->env[i]; i++)
		if (strchr(g->env[i], '@')) {
			snprintf(tmp, sizeof tmp, "/tmp/softrdma-conformance.XXXXXX");
			int fd = mkstemp(tmp);
			if (fd >= 0)
				close(fd);
		}
	fflush(stdout);
	double t0 = now_ms();
	pid_t pid = fork();
	if (pid == 0) {
		setpgid(0, 0);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		for (int i = 0; i < 3 && g->env[i]; i++) {
			char kv[256];
			snprintf(kv, sizeof kv, "%s", g->env[i]);
			char *eq = strchr(kv, '=');
			*eq = 0;
			setenv(kv, !strcmp(eq + 1, "@") ? tmp : eq + 1, 1);
		}
		close(pfd[0]);
		if (pfd[1] != 3) {
			dup2(pfd[1], 3);
			close(pfd[1]);
		}
		char *args[] = {"conformance", "--group", (char *)g->name, NULL};
		execv("/proc/self/exe", args);
		_exit(127);
	}
	close(pfd[1]);
	setpgid(pid, pid);
	int st = 0;
	double limit = now_ms() + 120000;
	while (waitpid(pid, &st, WNOHANG) != pid) {
		if (now_ms() > limit) {
			kill(-pid, SIGKILL);
			waitpid(pid, &st, 0);
			printf("FAIL [%s]: the group hung; killed\n", g->name);
			break;
		}
		nap_us(2000);
	}
	kill(-pid, SIGKILL);
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	char counts[64] = "";
	ssize_t n = read(pfd[0], counts, sizeof counts - 1);
	close(pfd[0]);
	int p = 0, f = 0, k = 0;
	if (n <= 0 || sscanf(counts, "%d %d %d", &p, &f, &k) != 3 || !WIFEXITED(st) ||
	    (WEXITSTATUS(st) != 0 && !f)) {
		printf("FAIL [%s]: the group's process failed (status %#x) (%.0f ms)\n", g->name, st,
		       now_ms() - t0);
		f++;
	}
	*pass += p;
	*fail += f;
	*skip += k;
	if (tmp[0])
		unlink(tmp);
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc > 1 && !strcmp(argv[1], "--print-keys")) { /* for t_seed */
		g_sh = mmap(NULL, sizeof *g_sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
			    -1, 0);
		print_keys();
		return 0;
	}
	if (argc > 1 && !strcmp(argv[1], "--list")) {
		for (int i = 0; i < NTESTS; i++)
			printf("%s%s%s\n", tests[i].group ? tests[i].group : "",
			       tests[i].group ? ": " : "", tests[i].name);
		return 0;
	}
	const char *group = NULL;
	if (argc > 2 && !strcmp(argv[1], "--group")) {
		group = argv[2];
		argv += 2;
		argc -= 2;
	}
	if (!group) {
		/* The library reads SOFTRDMA_* once at load: run with a clean configuration. */
		int dirty = 0;
		for (char **e = environ; *e; e++)
			if (!strncmp(*e, "SOFTRDMA_", 9))
				dirty = 1;
		if (dirty) {
			for (;;) {
				char **e = environ;
				while (*e && strncmp(*e, "SOFTRDMA_", 9))
					e++;
				if (!*e)
					break;
				char name[128];
				snprintf(name, sizeof name, "%.*s", (int)strcspn(*e, "="), *e);
				unsetenv(name);
			}
			execv("/proc/self/exe", argv);
			perror("execv /proc/self/exe");
			return 2;
		}
	}
	g_sh = mmap(NULL, sizeof *g_sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (g_sh == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	signal(SIGPIPE, SIG_IGN);
	/* Registrations are charged to RLIMIT_MEMLOCK: take what the hard limit allows. */
	struct rlimit rl;
	if (!getrlimit(RLIMIT_MEMLOCK, &rl) && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_MEMLOCK, &rl);
	}
	int pass = 0, fail = 0, skip = 0;
	double t0 = now_ms();
	if (group) {
		char prefix[64];
		snprintf(prefix, sizeof prefix, "[%s] ", group);
		g_group_prefix = prefix;
		run_group(strcmp(group, "default") ? group : NULL, argc, argv, &pass, &fail, &skip);
		char counts[64];
		int n = snprintf(counts, sizeof counts, "%d %d %d\n", pass, fail, skip);
		if (fcntl(3, F_GETFD) != -1) {
			ssize_t w = write(3, counts, (size_t)n);
			(void)w;
		}
		return fail ? 1 : 0;
	}
	run_group(NULL, argc, argv, &pass, &fail, &skip);
	for (int i = 0; i < NGROUPS; i++) {
		int any = 0;
		for (int j = 0; j < NTESTS; j++)
			if (tests[j].group && !strcmp(tests[j].group, envgroups[i].name) &&
			    (argc <= 1 || name_selected(tests[j].name, argc, argv) ||
			     name_selected(envgroups[i].name, argc, argv)))
				any = 1;
		if (any)
			run_envgroup(&envgroups[i], &pass, &fail, &skip);
	}
	printf("\n%d passed, %d skipped, %d failed (%.1f s)\n", pass, skip, fail,
	       (now_ms() - t0) / 1000);
	if (skip)
		printf("(skipped tests cannot run in this environment, see their lines; with "
		       "root's CAP_IPC_LOCK they all run)\n");
	return fail ? 1 : 0;
}
