//! Store micro benches: push (Sum) and pull of sorted key lists into a store that already
//! holds the keys, the first push of 10^6 keys into an empty store (every key inserted,
//! the tables growing from their initial size), and range push / pull of a 16 MiB dense block, single thread. Criterion
//! reports `thrpt` in elements per second: one element is one key (f32, value_len 1).
//!
//! Run: `cargo bench -p pserv-engine --bench store -- --warm-up-time 1 --measurement-time 3`

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pserv_engine::store::{Store, StoreConfig};
use pserv_engine::update::Sum;
use pserv_engine::KeyRange;

/// splitmix64: reproducible random keys without pulling an RNG into the bench.
fn random_keys(n: usize, seed: u64) -> Vec<u64> {
    let mut x = seed;
    let mut keys: Vec<u64> = (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % (u64::MAX - 1)
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// A store (16 shards) over `range` already holding `keys`.
fn store_with(range: KeyRange, keys: &[u64]) -> Store<f32> {
    let store = Store::<f32>::new(range, StoreConfig::default()).unwrap();
    store.push(keys, &vec![1.0; keys.len()], &Sum).unwrap();
    store
}

fn key_lists(c: &mut Criterion) {
    let sequential: Vec<u64> = (1u64 << 40..(1 << 40) + 1_000_000).collect();
    let own_range = KeyRange::new(sequential[0], sequential[sequential.len() - 1] + 1);
    // (name, keys, the store's range). Over the whole key space, sequential keys all fall
    // into one of the 16 shards (one 32 MiB table); a server owning just those keys spreads
    // them over all 16 shards (2 MiB tables, which stay cache-resident while their chunk
    // of the request runs).
    let cases: Vec<(&str, Vec<u64>, KeyRange)> = vec![
        ("random/1e3", random_keys(1_000, 1), KeyRange::FULL),
        ("random/1e5", random_keys(100_000, 2), KeyRange::FULL),
        ("random/1e6", random_keys(1_000_000, 3), KeyRange::FULL),
        ("sequential/1e6", sequential.clone(), KeyRange::FULL),
        ("sequential_own_range/1e6", sequential, own_range),
    ];
    let mut push = c.benchmark_group("push_sum_f32");
    for (name, keys, range) in &cases {
        let store = store_with(*range, keys);
        let grads = vec![0.5f32; keys.len()];
        push.throughput(Throughput::Elements(keys.len() as u64));
        push.bench_with_input(BenchmarkId::from_parameter(name), keys, |b, keys| {
            b.iter(|| {
                store
                    .push(black_box(keys), black_box(&grads), &Sum)
                    .unwrap()
            })
        });
    }
    push.finish();

    let mut pull = c.benchmark_group("pull_f32");
    for (name, keys, range) in &cases {
        let store = store_with(*range, keys);
        let mut out = vec![0f32; keys.len()];
        pull.throughput(Throughput::Elements(keys.len() as u64));
        pull.bench_with_input(BenchmarkId::from_parameter(name), keys, |b, keys| {
            b.iter(|| {
                store.pull(black_box(keys), &mut out).unwrap();
                black_box(&out);
            })
        });
    }
    pull.finish();

    let mut push_pull = c.benchmark_group("push_pull_sum_f32");
    let (name, keys, range) = &cases[2];
    let store = store_with(*range, keys);
    let grads = vec![0.5f32; keys.len()];
    let mut out = vec![0f32; keys.len()];
    push_pull.throughput(Throughput::Elements(keys.len() as u64));
    push_pull.bench_with_input(BenchmarkId::from_parameter(name), keys, |b, keys| {
        b.iter(|| {
            store
                .push_pull(black_box(keys), &grads, &Sum, &mut out)
                .unwrap();
            black_box(&out);
        })
    });
    push_pull.finish();
}

/// The first push of 10^6 new keys into a fresh store (16 shards, the server's default
/// configuration over the whole key space): allocation, growth and insertion. The store is
/// built (and later dropped) outside the timed part.
fn first_insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("first_push_sum_f32");
    let cases = [
        ("random/1e6", random_keys(1_000_000, 3)),
        (
            "sequential/1e6",
            (1u64 << 40..(1 << 40) + 1_000_000).collect(),
        ),
    ];
    for (name, keys) in &cases {
        let grads = vec![0.5f32; keys.len()];
        g.throughput(Throughput::Elements(keys.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), keys, |b, keys| {
            b.iter_batched(
                || Store::<f32>::new(KeyRange::FULL, StoreConfig::default()).unwrap(),
                |store| {
                    store.push(black_box(keys), &grads, &Sum).unwrap();
                    store
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn ranges(c: &mut Criterion) {
    const KEYS: u64 = (16 << 20) / 4;
    let range = KeyRange::new(1 << 40, (1 << 40) + KEYS);
    // One shard so the range is one block, as a server holding one dense range would.
    let cfg = StoreConfig {
        shards: 1,
        ..StoreConfig::default()
    };
    let store = Store::<f32>::new(KeyRange::FULL, cfg).unwrap();
    let grads = vec![0.5f32; KEYS as usize];
    store.push_range(range, &grads, &Sum).unwrap();
    let sharded = Store::<f32>::new(range, StoreConfig::default()).unwrap();
    sharded.push_range(range, &grads, &Sum).unwrap();
    let mut out = vec![0f32; KEYS as usize];

    let mut g = c.benchmark_group("range_f32_16MiB");
    g.throughput(Throughput::Elements(KEYS));
    g.bench_function("push_range_sum", |b| {
        b.iter(|| store.push_range(range, black_box(&grads), &Sum).unwrap())
    });
    g.bench_function("push_range_sum_16_shards", |b| {
        b.iter(|| sharded.push_range(range, black_box(&grads), &Sum).unwrap())
    });
    g.bench_function("pull_range", |b| {
        b.iter(|| {
            store.pull_range(range, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, key_lists, first_insert, ranges);
criterion_main!(benches);
