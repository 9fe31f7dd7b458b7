//! VIP announcements for scale-out (ECMP over BGP): the agent tells the local BGP
//! speaker which VIPs this node may attract by keeping one blackhole route per
//! ready VIP (`/32` or `/128`) in a routing table of its own (`--announce-table`).
//! BIRD's kernel protocol learns that table (`learn`) and exports the routes over
//! BGP; the agent never speaks BGP itself.
//!
//! Why kernel routes: they outlive the agent. After a crash, or a stop with
//! `--keep-on-exit`, the XDP program keeps forwarding from its pins, so the node
//! must stay announced; the routes stay with it. A clean stop withdraws them
//! (`Announcer::stop`), waits for the routers to converge, and only then detaches.
//! The table is not used for forwarding (no `ip rule` points at it), and the
//! routes carry protocol `ROUTE_PROTOCOL`, so `ip route show table N proto 190`
//! lists exactly what the agent announces; other routes there are left alone.
//!
//! The rule (`wanted`): a VIP is announced while at least one of its services
//! (a VIP can carry several port/protocol services) is ready: its Maglev table is
//! not empty (primaries up, or backups serving under `on_all_down: backup`), or
//! it passes traffic to the local stack (`on_all_down: pass`). The agent only
//! starts announcing once its program is attached and its maps filled.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use futures::TryStreamExt;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::{Handle, IpVersion};
use tokio::sync::{mpsc, oneshot};

use crate::plan::Plan;

/// Protocol number on the agent's routes (`proto 190` in `ip route`).
pub const ROUTE_PROTOCOL: u8 = 190;

/// How often the table is compared with what should be announced even when
/// nothing changed (restores routes removed by hand, retries failed updates).
const RESYNC: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("reading routing table {table}: {source}")]
    List { table: u32, source: Box<rtnetlink::Error> },
    #[error("adding {vip} to routing table {table}: {source}")]
    Add { table: u32, vip: IpAddr, source: Box<rtnetlink::Error> },
    #[error("removing {vip} from routing table {table}: {source}")]
    Del { table: u32, vip: IpAddr, source: Box<rtnetlink::Error> },
}

/// The VIPs this node should announce for `plan` (the rule in the module doc).
pub fn wanted(plan: &Plan) -> BTreeSet<IpAddr> {
    plan.services
        .iter()
        .filter(|s| !s.table.is_empty() || s.value.flags & lb_common::SERVICE_PASS_ON_EMPTY != 0)
        // Prefix services are not announced (a host route would be wrong):
        // routing the prefix to the balancers is the operator's.
        .filter(|s| s.prefix_len().is_none())
        .map(|s| s.vip)
        .collect()
}

/// Routes to add and to remove to go from `current` to `wanted`.
pub fn diff(current: &BTreeSet<IpAddr>, wanted: &BTreeSet<IpAddr>) -> (Vec<IpAddr>, Vec<IpAddr>) {
    (wanted.difference(current).copied().collect(), current.difference(wanted).copied().collect())
}

/// The agent's routes in one routing table.
pub struct RouteTable {
    handle: Handle,
    table: u32,
}

fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}

fn host_destination(m: &RouteMessage) -> Option<IpAddr> {
    let addr = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    let host = if addr.is_ipv4() { 32 } else { 128 };
    (m.header.destination_prefix_length == host).then_some(addr)
}

impl RouteTable {
    /// Opens an rtnetlink connection (its task runs on the current tokio runtime).
    pub fn connect(table: u32) -> Result<RouteTable, AnnounceError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(AnnounceError::Connect)?;
        tokio::spawn(conn);
        Ok(RouteTable { handle, table })
    }

    async fn messages(&self) -> Result<Vec<RouteMessage>, AnnounceError> {
        let mut out = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(|e| AnnounceError::List { table: self.table, source: Box::new(e) })?;
            out.extend(routes.into_iter().filter(|m| {
                table_of(m) == self.table && m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
            }));
        }
        Ok(out)
    }

    /// The VIPs announced in the table now.
    pub async fn list(&self) -> Result<BTreeSet<IpAddr>, AnnounceError> {
        Ok(self.messages().await?.iter().filter_map(host_destination).collect())
    }

    pub async fn add(&self, vip: IpAddr) -> Result<(), AnnounceError> {
        let req = self
            .handle
            .route()
            .add()
            .table_id(self.table)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .kind(RouteType::BlackHole);
        let res = match vip {
            IpAddr::V4(a) => req.v4().destination_prefix(a, 32).replace().execute().await,
            IpAddr::V6(a) => req.v6().destination_prefix(a, 128).replace().execute().await,
        };
        res.map_err(|e| AnnounceError::Add { table: self.table, vip, source: Box::new(e) })
    }

    pub async fn del(&self, vip: IpAddr) -> Result<(), AnnounceError> {
        for m in self.messages().await? {
            if host_destination(&m) == Some(vip) {
                self.handle
                    .route()
                    .del(m)
                    .execute()
                    .await
                    .map_err(|e| AnnounceError::Del { table: self.table, vip, source: Box::new(e) })?;
            }
        }
        Ok(())
    }

    /// Brings the table to `wanted`; returns how many routes were added and removed.
    pub async fn sync(&self, wanted: &BTreeSet<IpAddr>) -> Result<(usize, usize), AnnounceError> {
        let current = self.list().await?;
        let (add, del) = diff(&current, wanted);
        for vip in &add {
            self.add(*vip).await?;
            tracing::warn!(%vip, table = self.table, "VIP announced (route added)");
        }
        for vip in &del {
            self.del(*vip).await?;
            tracing::warn!(%vip, table = self.table, "VIP withdrawn (route removed)");
        }
        Ok((add.len(), del.len()))
    }
}

enum Msg {
    Want(BTreeSet<IpAddr>),
    /// Withdraw everything (or leave it, `withdraw: false`) and end the task.
    Stop { withdraw: bool, done: oneshot::Sender<usize> },
}

/// The announcing task's handle; a no-op when announcements are off.
#[derive(Default)]
pub struct Announcer {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The last set sent, so unchanged plans send nothing.
    last: Option<BTreeSet<IpAddr>>,
    table: u32,
}

impl Announcer {
    /// Starts announcing in `table` (None: announcements off).
    pub fn start(table: Option<u32>) -> Result<Announcer, AnnounceError> {
        let Some(table) = table else { return Ok(Announcer::default()) };
        let routes = RouteTable::connect(table)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tracing::info!(table, "announcing ready VIPs as routes in table {table} (proto {ROUTE_PROTOCOL})");
        Ok(Announcer { tx: Some(tx), task: Some(tokio::spawn(announce_task(routes, rx))), last: None, table })
    }

    /// Announces what `plan` makes ready (called whenever the maps took a new plan).
    pub fn update(&mut self, plan: &Plan) {
        let Some(tx) = &self.tx else { return };
        let want = wanted(plan);
        if self.last.as_ref() != Some(&want) {
            self.last = Some(want.clone());
            let _ = tx.send(Msg::Want(want));
        }
    }

    /// For `lb-agent status`: the table and the VIPs announced (None when off).
    pub fn status(&self) -> Option<Box<crate::status::AnnounceStatus>> {
        self.tx.as_ref()?;
        let vips = self.last.iter().flatten().copied().collect();
        Some(Box::new(crate::status::AnnounceStatus { table: self.table, vips }))
    }

    /// Ends the task. With `withdraw`, removes every route first and, if any was
    /// removed, waits `converge` for the routers to stop sending before the caller
    /// detaches the program; without, leaves the routes (the program stays).
    pub async fn stop(mut self, withdraw: bool, converge: Duration) {
        let (Some(tx), Some(task)) = (self.tx.take(), self.task.take()) else { return };
        let (done, removed) = oneshot::channel();
        let _ = tx.send(Msg::Stop { withdraw, done });
        let removed = removed.await.unwrap_or(0);
        let _ = task.await;
        if removed > 0 {
            tracing::info!(routes = removed, wait = ?converge, "VIPs withdrawn: waiting for the routers to converge before detaching");
            tokio::time::sleep(converge).await;
        }
    }
}

async fn announce_task(routes: RouteTable, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut want: Option<BTreeSet<IpAddr>> = None;
    let mut tick = tokio::time::interval(RESYNC);
    let mut failing = false;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => m,
                // The agent went away without `stop` (a crash-like exit): the
                // routes stay, as the program does.
                None => return,
            },
            _ = tick.tick() => match &want {
                Some(w) => Msg::Want(w.clone()),
                None => continue,
            },
        };
        match msg {
            Msg::Want(w) => {
                match routes.sync(&w).await {
                    Ok(_) if failing => {
                        tracing::info!(table = routes.table, "announcements in step again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        tracing::error!(error = %e, "could not update the announcements; retried every {RESYNC:?}");
                        failing = true;
                    }
                    Err(_) => {}
                }
                want = Some(w);
            }
            Msg::Stop { withdraw, done } => {
                let mut removed = 0;
                if withdraw {
                    match routes.sync(&BTreeSet::new()).await {
                        Ok((_, n)) => removed = n,
                        Err(e) => tracing::error!(error = %e, "could not withdraw the announcements"),
                    }
                } else if want.as_ref().is_some_and(|w| !w.is_empty()) {
                    tracing::info!(table = routes.table, "VIP routes left in place: the balancer stays attached");
                }
                let _ = done.send(removed);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
