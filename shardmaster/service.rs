//! The `ShardMaster` gRPC service: translates requests into proposals and reads of
//! the replicated [`MasterState`], and results into replies.

use super::liveness::Liveness;
use super::state::{MasterState, Outcome};
use crate::proto::shard_master_server::ShardMaster;
use crate::proto::storage::master_command::Command;
use crate::proto::storage::{self, MasterCommand};
use crate::proto::{
    AddNodeRequest, CancelMoveRequest, Config, ConfigReply, FinishMoveRequest, HeartbeatReply,
    HeartbeatRequest, JoinRequest, LeaveRequest, MovePhase, MoveRequest, QueryRequest,
    RemoveNodeRequest, ReportMoveReply, ReportMoveRequest, SchedulerReply, SchedulerRequest,
    SetSchedulerRequest, SplitRequest, StatusReply, StatusRequest,
};
use crate::replica::{Replica, Role};
use crate::status;
use slog::Logger;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::{Code, Request, Response, Status};

pub struct MasterService {
    replica: Replica<MasterState>,
    liveness: Arc<Liveness>,
}

impl MasterService {
    /// `down_after`: silence after which a kvnode is reported DOWN.
    pub fn new(replica: Replica<MasterState>, down_after: Duration) -> MasterService {
        MasterService {
            replica,
            liveness: Arc::new(Liveness::new(down_after)),
        }
    }

    /// The placement scheduler's loop, on this replica whenever it leads (it reads
    /// the ranges' statistics from the heartbeats this service receives).
    pub fn scheduler(&self, logger: Logger) -> impl std::future::Future<Output = ()> + use<> {
        super::placement::run_scheduler(self.replica.clone(), self.liveness.clone(), logger)
    }

    fn scheduler_reply(&self) -> SchedulerReply {
        let state = self.replica.state();
        SchedulerReply {
            settings: Some(*state.settings()),
            history: state.history(),
        }
    }

    /// Keeps the liveness table in step with this replica's leadership.
    fn observe_role(&self) -> bool {
        observe_role(&self.replica, &self.liveness)
    }

    /// Sets the shard master's gauges at each metrics scrape: the latest
    /// configuration, the live moves by phase, and (on the leader) the kvnodes by
    /// liveness.
    pub fn report_metrics(&self) {
        let replica = self.replica.clone();
        let liveness = self.liveness.clone();
        crate::metrics::metrics().on_scrape(move || {
            let m = crate::metrics::metrics();
            observe_role(&replica, &liveness);
            let (latest, moves) = {
                let state = replica.state();
                (state.latest().clone(), state.moves())
            };
            m.master.config_num.set(latest.num as i64);
            let [unknown, up, down] = liveness.counts(&latest);
            m.master.set_nodes("unknown", unknown);
            m.master.set_nodes("up", up);
            m.master.set_nodes("down", down);
            // (ranges, bytes) by group; a range's stats name it by its bounds, and
            // its start is enough to find it in the configuration.
            let mut groups: BTreeMap<u64, (usize, u64)> =
                latest.groups.iter().map(|g| (g.gid, (0, 0))).collect();
            let mut owner = HashMap::new();
            for r in &latest.ranges {
                owner.insert(start(&r.range), r.gid);
                if let Some(g) = groups.get_mut(&r.gid) {
                    g.0 += 1;
                }
            }
            for s in liveness.range_stats(&latest) {
                if let Some(g) = owner
                    .get(&start(&s.range))
                    .and_then(|gid| groups.get_mut(gid))
                {
                    g.1 += s.bytes;
                }
            }
            m.master
                .set_groups(groups.into_iter().map(|(gid, (n, bytes))| (gid, n, bytes)));
            let in_phase = |phase: MovePhase| {
                moves
                    .iter()
                    .filter(|p| !p.queued && p.phase() == phase)
                    .count()
            };
            m.moves
                .set_plans("queued", moves.iter().filter(|p| p.queued).count());
            m.moves
                .set_plans("copying", in_phase(MovePhase::MoveCopying));
            m.moves
                .set_plans("catching_up", in_phase(MovePhase::MoveCatchingUp));
            m.moves
                .set_plans("cutting_over", in_phase(MovePhase::MoveCuttingOver));
        });
    }

    async fn execute(&self, command: Command) -> Result<Response<ConfigReply>, Status> {
        let num = propose(&self.replica, command).await?;
        let config = self.local_config(num)?;
        Ok(Response::new(ConfigReply {
            config: Some(config),
        }))
    }

    fn local_config(&self, num: u64) -> Result<Config, Status> {
        self.replica
            .state()
            .config(num)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::internal(format!("configuration {num} not applied")))
    }
}

/// A range's start key (a message's range is always set; missing reads as empty).
fn start(range: &Option<crate::proto::KeyRange>) -> Vec<u8> {
    range.as_ref().map(|r| r.start.clone()).unwrap_or_default()
}

/// Keeps `liveness` in step with the replica's leadership; true if it leads.
fn observe_role(replica: &Replica<MasterState>, liveness: &Liveness) -> bool {
    let status = replica.status();
    let leading = status.role == Role::Leader;
    liveness.observe(leading.then_some(status.term));
    leading
}

/// Proposes `command` and waits for its outcome: the configuration number it produced.
pub(crate) async fn propose(
    replica: &Replica<MasterState>,
    command: Command,
) -> Result<u64, Status> {
    let outcome: Outcome = replica
        .propose(MasterCommand {
            command: Some(command),
            at_ms: now_ms(),
        })
        .await?;
    outcome.map_err(|e| Status::new(Code::from_i32(e.code), e.message))
}

/// Wall-clock milliseconds since the Unix epoch (what the history shows as "when").
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tonic::async_trait]
impl ShardMaster for MasterService {
    /// Any replica answers from what it has applied.
    async fn scheduler(
        &self,
        _: Request<SchedulerRequest>,
    ) -> Result<Response<SchedulerReply>, Status> {
        Ok(Response::new(self.scheduler_reply()))
    }

    async fn set_scheduler(
        &self,
        r: Request<SetSchedulerRequest>,
    ) -> Result<Response<SchedulerReply>, Status> {
        propose(&self.replica, Command::SetScheduler(r.into_inner().into())).await?;
        Ok(Response::new(self.scheduler_reply()))
    }

    async fn join(&self, r: Request<JoinRequest>) -> Result<Response<ConfigReply>, Status> {
        self.execute(Command::Join(r.into_inner().into())).await
    }

    async fn leave(&self, r: Request<LeaveRequest>) -> Result<Response<ConfigReply>, Status> {
        self.execute(Command::Leave(r.into_inner().into())).await
    }

    async fn r#move(&self, r: Request<MoveRequest>) -> Result<Response<ConfigReply>, Status> {
        self.execute(Command::Move(r.into_inner().into())).await
    }

    async fn cancel_move(
        &self,
        r: Request<CancelMoveRequest>,
    ) -> Result<Response<ConfigReply>, Status> {
        self.execute(Command::CancelMove(r.into_inner().into()))
            .await
    }

    async fn finish_move(
        &self,
        r: Request<FinishMoveRequest>,
    ) -> Result<Response<ConfigReply>, Status> {
        self.execute(Command::FinishMove(r.into_inner().into()))
            .await
    }

    async fn report_move(
        &self,
        r: Request<ReportMoveRequest>,
    ) -> Result<Response<ReportMoveReply>, Status> {
        match propose(&self.replica, Command::ReportMove(r.into_inner().into())).await {
            Ok(_) => Ok(Response::new(ReportMoveReply { planned: true })),
            Err(e) if e.code() == Code::NotFound => {
                Ok(Response::new(ReportMoveReply { planned: false }))
            }
            Err(e) => Err(e),
        }
    }

    async fn split(&self, r: Request<SplitRequest>) -> Result<Response<ConfigReply>, Status> {
        self.execute(Command::Split(r.into_inner().into())).await
    }

    async fn add_node(&self, r: Request<AddNodeRequest>) -> Result<Response<ConfigReply>, Status> {
        self.execute(Command::AddNode(r.into_inner().into())).await
    }

    async fn remove_node(
        &self,
        r: Request<RemoveNodeRequest>,
    ) -> Result<Response<ConfigReply>, Status> {
        self.execute(Command::RemoveNode(r.into_inner().into()))
            .await
    }

    /// Committed configurations never change, so any replica answers for one it has
    /// applied. The latest one is linearizable at the leader (ReadIndex); a follower
    /// answers with the latest it has applied.
    async fn query(&self, r: Request<QueryRequest>) -> Result<Response<Config>, Status> {
        let requested = r.into_inner().num;
        let is_leader = self.replica.status().role == Role::Leader;
        if is_leader {
            self.replica
                .read_barrier()
                .await
                .map_err(status::from_replica)?;
        }
        let latest = self.replica.state().latest().num;
        let num = match requested {
            None => latest,
            Some(n) if n <= latest => n,
            Some(n) if is_leader => {
                return Err(status::invalid_argument(
                    "num",
                    format!("configuration {n} does not exist yet; the latest is {latest}"),
                    latest,
                ))
            }
            // This follower may be behind: the leader knows.
            Some(_) => {
                return Err(status::from_replica(self.replica.status().not_leader()));
            }
        };
        Ok(Response::new(self.local_config(num)?))
    }

    async fn heartbeat(
        &self,
        r: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        if !self.observe_role() {
            return Err(status::from_replica(self.replica.status().not_leader()));
        }
        self.liveness.record(r.into_inner());
        Ok(Response::new(HeartbeatReply {}))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        self.observe_role();
        let replica = self.replica.status().to_proto();
        let (latest, moves) = {
            let state = self.replica.state();
            (state.latest().clone(), state.moves())
        };
        Ok(Response::new(StatusReply {
            replica: Some(replica),
            latest_config_num: latest.num,
            nodes: self.liveness.report(&latest),
            ranges: self.liveness.range_stats(&latest),
            moves,
        }))
    }
}

// The requests as the log stores them (`shardkv.storage.v1`): field by field, so a
// change of the public request does not change what replicas replay.

impl From<JoinRequest> for storage::Join {
    fn from(r: JoinRequest) -> storage::Join {
        storage::Join {
            groups: r.groups,
            id: r.id.map(Into::into),
            immediate: r.immediate,
        }
    }
}

impl From<LeaveRequest> for storage::Leave {
    fn from(r: LeaveRequest) -> storage::Leave {
        storage::Leave {
            gids: r.gids,
            id: r.id.map(Into::into),
            immediate: r.immediate,
        }
    }
}

impl From<MoveRequest> for storage::Move {
    fn from(r: MoveRequest) -> storage::Move {
        storage::Move {
            key: r.key,
            gid: r.gid,
            id: r.id.map(Into::into),
            immediate: r.immediate,
        }
    }
}

impl From<CancelMoveRequest> for storage::CancelMove {
    fn from(r: CancelMoveRequest) -> storage::CancelMove {
        storage::CancelMove {
            key: r.key,
            id: r.id.map(Into::into),
            plan_id: r.plan_id,
            reason: r.reason,
        }
    }
}

impl From<FinishMoveRequest> for storage::FinishMove {
    fn from(r: FinishMoveRequest) -> storage::FinishMove {
        storage::FinishMove { plan_id: r.plan_id }
    }
}

impl From<ReportMoveRequest> for storage::ReportMove {
    fn from(r: ReportMoveRequest) -> storage::ReportMove {
        storage::ReportMove {
            progress: r.progress,
        }
    }
}

impl From<SplitRequest> for storage::Split {
    fn from(r: SplitRequest) -> storage::Split {
        storage::Split {
            key: r.key,
            id: r.id.map(Into::into),
        }
    }
}

impl From<AddNodeRequest> for storage::AddNode {
    fn from(r: AddNodeRequest) -> storage::AddNode {
        storage::AddNode {
            gid: r.gid,
            node: r.node,
            id: r.id.map(Into::into),
        }
    }
}

impl From<RemoveNodeRequest> for storage::RemoveNode {
    fn from(r: RemoveNodeRequest) -> storage::RemoveNode {
        storage::RemoveNode {
            gid: r.gid,
            node_id: r.node_id,
            id: r.id.map(Into::into),
        }
    }
}

impl From<SetSchedulerRequest> for storage::SetScheduler {
    fn from(r: SetSchedulerRequest) -> storage::SetScheduler {
        storage::SetScheduler {
            settings: r.settings,
            set_flags: r.set_flags,
            id: r.id.map(Into::into),
        }
    }
}
