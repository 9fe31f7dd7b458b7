//! What the schedulers other than Maglev find in their service's table region
//! (`lb-ebpf/src/sched/`): a rotation period for `rr`/`wrr`, the list of
//! candidates for `lc`/`wlc`/`lblc`/`lblcr`. Like `maglev::build_table`, each returns indices
//! into the backends it is given (the service's members in address order);
//! backends with weight 0 (drained, down, or not serving) are left out.

use crate::config::Scheduler;

/// The table of `scheduler` over backends of `weights` (index order), at most
/// `max_len` slots (the service's `table_size`).
pub fn build(scheduler: Scheduler, weights: &[u32], max_len: u32) -> Vec<u32> {
    let live = || weights.iter().enumerate().filter(|(_, w)| **w > 0).map(|(i, _)| i as u32);
    match scheduler {
        Scheduler::Maglev | Scheduler::Sh { .. } | Scheduler::Dh => {
            unreachable!("Maglev tables come from maglev::build_table")
        }
        Scheduler::Rr | Scheduler::Lc | Scheduler::Wlc | Scheduler::Lblc | Scheduler::Lblcr => {
            live().take(max_len as usize).collect()
        }
        Scheduler::Wrr => smooth_wrr(weights, max_len),
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One period of nginx's smooth weighted round robin
/// (`ngx_http_upstream_get_peer`): each pick adds every weight to its backend's
/// current score, takes the highest (the first on ties) and takes the total
/// weight off it. Weights are divided by their gcd first, so the period is the
/// sum of the reduced weights; when that exceeds `max_len` they are scaled down
/// (each at least 1), which keeps the order smooth and the shares within one
/// slot per backend of `max_len`.
pub fn smooth_wrr(weights: &[u32], max_len: u32) -> Vec<u32> {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w));
    if g == 0 {
        return Vec::new();
    }
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x / g)).collect();
    let sum: u64 = w.iter().sum();
    if sum > u64::from(max_len) {
        let live = w.iter().filter(|x| **x > 0).count() as u64;
        let room = u64::from(max_len).saturating_sub(live).max(1);
        for x in w.iter_mut().filter(|x| **x > 0) {
            *x = 1 + (*x - 1) * room / sum;
        }
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = usize::MAX;
        for (i, c) in current.iter_mut().enumerate() {
            *c += w[i] as i64;
        }
        for (i, &c) in current.iter().enumerate() {
            if w[i] > 0 && (best == usize::MAX || c > current[best]) {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest run of one backend in a rotation, counted cyclically.
    fn longest_run(t: &[u32]) -> usize {
        let n = t.len();
        (0..n)
            .map(|start| (0..n).take_while(|k| t[(start + k) % n] == t[start]).count())
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn smooth_wrr_is_nginx_order() {
        // nginx's documented example: weights 5, 1, 1 -> a a b a c a a.
        assert_eq!(smooth_wrr(&[5, 1, 1], 100), vec![0, 0, 1, 0, 2, 0, 0]);
        // Weights 1, 2, 3 (reduced by their gcd from 10, 20, 30): period 6.
        let t = smooth_wrr(&[10, 20, 30], 100);
        assert_eq!(t, vec![2, 1, 0, 2, 1, 2]);
        assert_eq!(longest_run(&t), 2, "{t:?}");
        // Weight 0 never appears.
        assert_eq!(smooth_wrr(&[0, 1, 1], 100), vec![1, 2]);
        assert!(smooth_wrr(&[0, 0], 100).is_empty());
    }

    #[test]
    fn smooth_wrr_scales_down_to_fit() {
        let t = smooth_wrr(&[1, 65_535, 1000], 13);
        assert!(t.len() <= 13, "{t:?}");
        for i in 0..3 {
            assert!(t.contains(&i), "backend {i} missing from {t:?}");
        }
    }

    #[test]
    fn candidate_lists() {
        assert_eq!(build(Scheduler::Rr, &[3, 0, 1], 13), vec![0, 2]);
        assert_eq!(build(Scheduler::Wlc, &[3, 0, 1], 13), vec![0, 2]);
        assert_eq!(build(Scheduler::Wrr, &[1, 0, 2], 13), vec![2, 0, 2]);
    }
}
