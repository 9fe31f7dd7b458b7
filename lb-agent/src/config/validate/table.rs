//! A service's `table_size`: in range, prime, larger than its backend count
//! (default: `config::default_table_size` of that count), and the backend count
//! within what one table can index.

use super::super::raw::Int;
use super::super::{default_table_size, MAX_TABLE_SIZE, MIN_TABLE_SIZE};
use super::{is_prime, Checker};

impl Checker<'_> {
    /// The table size of the service at `path` with `count` backends.
    pub(super) fn table(&mut self, raw: Option<Int>, count: usize, path: &str) -> Option<u32> {
        let field = |name: &str| format!("{path}.{name}");
        let table_size = match raw {
            None => Some(default_table_size(count)),
            Some(v) => self.table_size(v, &field("table_size")),
        };
        if count > lb_common::table::TABLE_MAX_IDS {
            // A table's slots are 16-bit indexes into its list of backends.
            self.at_value(
                &field("backends"),
                format!("a service has at most {} backends, this one {count}", lb_common::table::TABLE_MAX_IDS),
            );
        }
        table_size.filter(|&size| {
            let fits = usize::try_from(size).is_ok_and(|size| size > count);
            if !fits {
                self.at_value(
                    &field("table_size"),
                    format!("table_size {size} must be larger than the number of backends ({count})"),
                );
            }
            fits
        })
    }

    fn table_size(&mut self, value: Int, path: &str) -> Option<u32> {
        let size = self.ranged(value, path, "table_size", MIN_TABLE_SIZE, MAX_TABLE_SIZE)?;
        if is_prime(size) {
            return Some(size);
        }
        let next = (size..=MAX_TABLE_SIZE).find(|&n| is_prime(n)).unwrap_or(MAX_TABLE_SIZE);
        self.at_value(path, format!("table_size {size} is not a prime number (the next prime is {next})"));
        None
    }
}
