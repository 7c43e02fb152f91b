//! The shard master's replicated state machine: the numbered history of
//! configurations, and the last outcome of each client so a retried command is
//! answered, not applied twice.
//!
//! Live moves are plans in the configuration (`Config::moves`): a new plan, its
//! cancellation and its cutover are each a configuration, so every group sees them
//! at one position of its own log. Their progress, reported by the destinations, is
//! kept beside the configurations.
//!
//! The placement scheduler's settings and its bounded history of decisions (its
//! own, and the operators' moves and splits, which it respects for a while) live
//! here too, so a new leader carries on from them.
//!
//! Stored keys: `c` + num (big-endian) -> `Config`; `s` + client id -> `MasterOutcome`;
//! `p` + plan id -> `MovePlan` (last reported progress); `g` -> `SchedulerSettings`;
//! `h` + sequence number (big-endian) -> `PlacementDecision`.

use super::balance::rebalance;
use super::placement::{self, Event, Recent};
use crate::config::MAX_KEY_BYTES;
use crate::proto::placement_decision::Kind;
use crate::proto::storage::master_command::Command;
use crate::proto::storage::master_outcome::Result as OutcomeResult;
use crate::proto::storage::{
    AddNode, CancelMove, CommandError, FinishMove, Join, Leave, MasterCommand, MasterOutcome, Move,
    RemoveNode, RequestId, ScheduleCommand, SetScheduler, Split,
};
use crate::proto::{
    Config, Group, KeyRange, MovePlan, PlacementDecision, RangeAssignment, SchedulerSettings,
};
use crate::replica::{StateMachine, UnknownCommand};
use crate::storage::{ApplyBatch, SmStore};
use prost::Message;
use std::collections::{BTreeSet, HashMap, HashSet};
use tonic::Code;

/// Clients whose last outcome is remembered; the least recently active is forgotten first.
const MAX_SESSIONS: usize = 10_000;
/// Placement decisions remembered (the oldest is forgotten first).
pub const MAX_HISTORY: usize = 256;
const KEY_SETTINGS: &[u8] = b"g";

fn history_key(seq: u64) -> Vec<u8> {
    let mut k = b"h".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// What applying a command answers: the number of the configuration it produced
/// (or the latest one, for a change that changed nothing), or why it was refused.
pub type Outcome = Result<u64, CommandError>;

fn refuse(code: Code, message: impl Into<String>) -> CommandError {
    CommandError {
        code: code as i32,
        message: message.into(),
    }
}

fn config_key(num: u64) -> Vec<u8> {
    let mut k = b"c".to_vec();
    k.extend_from_slice(&num.to_be_bytes());
    k
}

fn session_key(client: u64) -> Vec<u8> {
    let mut k = b"s".to_vec();
    k.extend_from_slice(&client.to_be_bytes());
    k
}

fn progress_key(plan: u64) -> Vec<u8> {
    let mut k = b"p".to_vec();
    k.extend_from_slice(&plan.to_be_bytes());
    k
}

/// The shard master's state. Reads take it through the replica's read lock.
#[derive(Default)]
pub struct MasterState {
    store: Option<SmStore>,
    latest: Config,
    sessions: HashMap<u64, MasterOutcome>,
    /// (log index of last command, client): the expiry order of `sessions`.
    session_order: BTreeSet<(u64, u64)>,
    /// Plan id -> the destination's last progress report.
    progress: HashMap<u64, MovePlan>,
    settings: SchedulerSettings,
    /// (sequence number, decision), oldest first.
    history: std::collections::VecDeque<(u64, PlacementDecision)>,
}

impl MasterState {
    pub fn new() -> MasterState {
        MasterState {
            latest: Config::initial(),
            settings: placement::default_settings(),
            ..Default::default()
        }
    }

    /// The placement scheduler's settings.
    pub fn settings(&self) -> &SchedulerSettings {
        &self.settings
    }

    /// The remembered placement decisions, oldest first.
    pub fn history(&self) -> Vec<PlacementDecision> {
        self.history.iter().map(|(_, d)| d.clone()).collect()
    }

    /// What the scheduler must respect: the remembered moves and splits.
    pub fn recent(&self) -> Vec<Recent> {
        self.history
            .iter()
            .filter_map(|(_, d)| {
                let event = match (d.manual, d.kind()) {
                    (true, Kind::Split) => Event::ManualSplit,
                    (true, _) => Event::ManualMove,
                    (false, Kind::Move) => Event::Moved,
                    (false, Kind::Split) => Event::Split,
                    (false, Kind::Merge) => return None,
                };
                Some(Recent {
                    range: d.range.clone()?,
                    at_ms: d.at_ms,
                    event,
                    from_gid: d.from_gid,
                })
            })
            .collect()
    }

    fn record(&mut self, decision: PlacementDecision, batch: &mut ApplyBatch) {
        let seq = self.history.back().map_or(0, |(s, _)| s + 1);
        batch.put(history_key(seq), decision.encode_to_vec());
        self.history.push_back((seq, decision));
        while self.history.len() > MAX_HISTORY {
            let (old, _) = self.history.pop_front().expect("non-empty");
            batch.delete(history_key(old));
        }
    }

    /// Applies a scheduler round: the decisions that still fit, as one configuration.
    fn schedule(&mut self, round: ScheduleCommand, batch: &mut ApplyBatch) -> Outcome {
        let mut next = self.latest.clone();
        next.num += 1;
        let done = placement::apply(&mut next, &round.decisions);
        let Some(next) = settle(next, !done.is_empty()) else {
            return Ok(self.latest.num);
        };
        for d in done {
            let d = PlacementDecision {
                at_ms: round.at_ms,
                config_num: next.num,
                ..d
            };
            self.record(d, batch);
        }
        self.install(next, batch);
        Ok(self.latest.num)
    }

    /// Makes `next` the latest configuration.
    fn install(&mut self, next: Config, batch: &mut ApplyBatch) {
        batch.put(config_key(next.num), next.encode_to_vec());
        // Progress of plans that ended (done or cancelled) is forgotten.
        let ended: Vec<u64> = self
            .progress
            .keys()
            .filter(|id| !next.moves.iter().any(|p| p.id == **id))
            .copied()
            .collect();
        for id in ended {
            self.progress.remove(&id);
            batch.delete(progress_key(id));
        }
        self.latest = next;
    }

    /// The newest configuration this replica has applied.
    pub fn latest(&self) -> &Config {
        &self.latest
    }

    /// The live moves of the latest configuration, with their reported progress.
    pub fn moves(&self) -> Vec<MovePlan> {
        self.latest
            .moves
            .iter()
            .map(|plan| match self.progress.get(&plan.id) {
                Some(p) => MovePlan {
                    phase: p.phase,
                    bytes_copied: p.bytes_copied,
                    lag_bytes: p.lag_bytes,
                    ..plan.clone()
                },
                None => plan.clone(),
            })
            .collect()
    }

    /// Records a destination's progress report; false if the plan no longer exists.
    fn report(&mut self, progress: MovePlan, batch: &mut ApplyBatch) -> bool {
        if !self.latest.moves.iter().any(|p| p.id == progress.id) {
            return false;
        }
        batch.put(progress_key(progress.id), progress.encode_to_vec());
        self.progress.insert(progress.id, progress);
        true
    }

    /// Configuration `num`, if it exists on this replica.
    pub fn config(&self, num: u64) -> anyhow::Result<Option<Config>> {
        if num == self.latest.num {
            return Ok(Some(self.latest.clone()));
        }
        if num > self.latest.num {
            return Ok(None);
        }
        if num == 0 {
            return Ok(Some(Config::initial()));
        }
        let store = self.store.as_ref().expect("restored before use");
        match store.get(&config_key(num))? {
            Some(raw) => Ok(Some(Config::decode(raw.as_slice())?)),
            None => anyhow::bail!("configuration {num} is missing from storage"),
        }
    }

    fn remember_outcome(
        &mut self,
        index: u64,
        id: RequestId,
        result: &Outcome,
        batch: &mut ApplyBatch,
    ) {
        if id.client_id == 0 {
            return;
        }
        let outcome = MasterOutcome {
            seq: id.seq,
            index,
            result: Some(match result {
                Ok(n) => OutcomeResult::ConfigNum(*n),
                Err(e) => OutcomeResult::Error(e.clone()),
            }),
        };
        self.remember(id.client_id, outcome, batch);
    }

    fn remember(&mut self, client: u64, outcome: MasterOutcome, batch: &mut ApplyBatch) {
        if let Some(old) = self.sessions.get(&client) {
            self.session_order.remove(&(old.index, client));
        }
        self.session_order.insert((outcome.index, client));
        batch.put(session_key(client), outcome.encode_to_vec());
        self.sessions.insert(client, outcome);
        while self.sessions.len() > MAX_SESSIONS {
            let (_, oldest) = self.session_order.pop_first().expect("non-empty");
            self.sessions.remove(&oldest);
            batch.delete(session_key(oldest));
        }
    }
}

fn outcome_of(outcome: &MasterOutcome) -> Outcome {
    match &outcome.result {
        Some(OutcomeResult::ConfigNum(n)) => Ok(*n),
        Some(OutcomeResult::Error(e)) => Err(e.clone()),
        None => Err(refuse(Code::Internal, "empty remembered outcome")),
    }
}

impl From<Command> for MasterCommand {
    fn from(command: Command) -> MasterCommand {
        MasterCommand {
            command: Some(command),
            at_ms: 0,
        }
    }
}

impl MasterState {
    /// Applies a command of a kind this build knows.
    fn apply_command(
        &mut self,
        index: u64,
        command: Command,
        at_ms: u64,
        batch: &mut ApplyBatch,
    ) -> Outcome {
        let id = request_id(&command);
        if id.client_id != 0 {
            if let Some(seen) = self.sessions.get(&id.client_id) {
                if id.seq == seen.seq {
                    return outcome_of(seen);
                }
                if id.seq < seen.seq {
                    return Err(refuse(
                        Code::FailedPrecondition,
                        format!("request {} was superseded by request {}", id.seq, seen.seq),
                    ));
                }
            }
        }
        if let Command::ReportMove(r) = command {
            let planned = self.report(r.progress.unwrap_or_default(), batch);
            return if planned {
                Ok(self.latest.num)
            } else {
                Err(refuse(Code::NotFound, "no such move plan"))
            };
        }
        let command = match command {
            Command::Schedule(round) => return self.schedule(round, batch),
            Command::SetScheduler(r) => {
                let result = updated(&self.settings, r).map(|settings| {
                    batch.put(KEY_SETTINGS, settings.encode_to_vec());
                    self.settings = settings;
                    self.latest.num
                });
                self.remember_outcome(index, id, &result, batch);
                return result;
            }
            other => other,
        };
        let manual = manual_decision(&self.latest, &command, at_ms);
        let result = match next_config(&self.latest, command) {
            Ok(Some(next)) => {
                if let Some(d) = manual {
                    self.record(
                        PlacementDecision {
                            config_num: next.num,
                            ..d
                        },
                        batch,
                    );
                }
                self.install(next, batch);
                Ok(self.latest.num)
            }
            Ok(None) => Ok(self.latest.num),
            Err(e) => Err(e),
        };
        self.remember_outcome(index, id, &result, batch);
        result
    }
}

impl StateMachine for MasterState {
    type Command = MasterCommand;
    type Response = Outcome;

    fn apply(
        &mut self,
        index: u64,
        command: MasterCommand,
        batch: &mut ApplyBatch,
    ) -> Result<Outcome, UnknownCommand> {
        let at_ms = command.at_ms;
        let command = command
            .command
            .ok_or_else(|| UnknownCommand::new(index, "a command of no kind this build knows"))?;
        Ok(self.apply_command(index, command, at_ms, batch))
    }

    fn restore(&mut self, store: &SmStore) -> anyhow::Result<()> {
        self.latest = match store.prefix(b"c").next_back() {
            Some(item) => Config::decode(&*item?.1)?,
            None => Config::initial(),
        };
        self.sessions.clear();
        self.session_order.clear();
        for item in store.prefix(b"s") {
            let (key, value) = item?;
            let client = u64::from_be_bytes(key[1..].try_into()?);
            let outcome = MasterOutcome::decode(&*value)?;
            self.session_order.insert((outcome.index, client));
            self.sessions.insert(client, outcome);
        }
        self.progress.clear();
        for item in store.prefix(b"p") {
            let plan = MovePlan::decode(&*item?.1)?;
            self.progress.insert(plan.id, plan);
        }
        self.settings = match store.get(KEY_SETTINGS)? {
            Some(raw) => SchedulerSettings::decode(raw.as_slice())?,
            None => placement::default_settings(),
        };
        self.history.clear();
        for item in store.prefix(b"h") {
            let (key, value) = item?;
            let seq = u64::from_be_bytes(key[1..].try_into()?);
            self.history
                .push_back((seq, PlacementDecision::decode(&*value)?));
        }
        self.store = Some(store.clone());
        Ok(())
    }
}

fn request_id(command: &Command) -> RequestId {
    let id = match command {
        Command::Join(r) => &r.id,
        Command::Leave(r) => &r.id,
        Command::Move(r) => &r.id,
        Command::Split(r) => &r.id,
        Command::AddNode(r) => &r.id,
        Command::RemoveNode(r) => &r.id,
        Command::CancelMove(r) => &r.id,
        Command::SetScheduler(r) => &r.id,
        Command::FinishMove(_) | Command::ReportMove(_) | Command::Schedule(_) => &None,
    };
    id.unwrap_or_default()
}

/// The configuration `command` makes from `current`: `Ok(None)` if it changes nothing,
/// `Err` if it is refused (and then nothing changes).
pub fn next_config(current: &Config, command: Command) -> Result<Option<Config>, CommandError> {
    let mut next = current.clone();
    next.num += 1;
    let changed = match command {
        Command::Join(r) => join(&mut next, r)?,
        Command::Leave(r) => leave(&mut next, r)?,
        Command::Move(r) => move_range(&mut next, r)?,
        Command::Split(r) => split(&mut next, r)?,
        Command::AddNode(r) => add_node(&mut next, r)?,
        Command::RemoveNode(r) => remove_node(&mut next, r)?,
        Command::CancelMove(r) => cancel_move(&mut next, r)?,
        Command::FinishMove(r) => finish_move(&mut next, r)?,
        // Progress, settings and rounds are MasterState::apply's.
        Command::ReportMove(_) | Command::SetScheduler(_) | Command::Schedule(_) => false,
    };
    Ok(settle(next, changed))
}

/// `next` after the rules every new configuration follows (void plans dropped,
/// leaving groups drained, queued plans started), or None if nothing changed.
fn settle(mut next: Config, changed: bool) -> Option<Config> {
    // A plan whose range was split, given away or whose groups left (or are leaving:
    // the range would only have to move again) is void: its source still holds the
    // range, so nothing is lost.
    let planned = next.moves.clone();
    let groups = next.groups.clone();
    let ranges = next.ranges.clone();
    next.moves.retain(|plan| {
        groups.iter().any(|g| g.gid == plan.dest && !g.leaving)
            && ranges
                .iter()
                .any(|r| r.range == plan.range && r.gid == plan.source)
    });
    drain_leaving(&mut next);
    activate_queued(&mut next);
    (changed || next.moves != planned || next.groups != groups).then_some(next)
}

/// An operator's move or split of `current`, for the history (the scheduler
/// respects it); None for anything else.
fn manual_decision(current: &Config, command: &Command, at_ms: u64) -> Option<PlacementDecision> {
    let (kind, key, to_gid) = match command {
        Command::Move(r) => (Kind::Move, &r.key, r.gid),
        Command::Split(r) => (Kind::Split, &r.key, 0),
        _ => return None,
    };
    let (range, from_gid) = current.owner(key);
    Some(PlacementDecision {
        kind: kind as i32,
        range: Some(range.clone()),
        at: if kind == Kind::Split {
            key.clone()
        } else {
            Vec::new()
        },
        from_gid: if kind == Kind::Move { from_gid } else { 0 },
        to_gid,
        why: "by an operator".into(),
        at_ms,
        manual: true,
        ..Default::default()
    })
}

/// `current` changed as `request` says, or why not (and then nothing changes).
fn updated(
    current: &SchedulerSettings,
    request: SetScheduler,
) -> Result<SchedulerSettings, CommandError> {
    const MIN_SPLIT: u64 = 64 << 10;
    const MAX_SPLIT: u64 = 4 << 30;
    const MAX_HOLD_MS: u64 = 7 * 24 * 3600 * 1000;
    let bad = |m: String| Err(refuse(Code::InvalidArgument, m));
    let r = request.settings.unwrap_or_default();
    let mut next = *current;
    if r.split_bytes != 0 {
        if !(MIN_SPLIT..=MAX_SPLIT).contains(&r.split_bytes) {
            return bad(format!(
                "split_bytes: {} is outside {MIN_SPLIT}..={MAX_SPLIT}",
                r.split_bytes
            ));
        }
        next.split_bytes = r.split_bytes;
    }
    if r.split_load != 0.0 {
        if !r.split_load.is_finite() || r.split_load < 1.0 {
            return bad(format!(
                "split_load: {} must be at least 1 op/s",
                r.split_load
            ));
        }
        next.split_load = r.split_load;
    }
    for (value, field, name) in [
        (r.hold_ms, &mut next.hold_ms, "hold_ms"),
        (r.manual_hold_ms, &mut next.manual_hold_ms, "manual_hold_ms"),
    ] {
        if value > MAX_HOLD_MS {
            return bad(format!("{name}: {value} is over {MAX_HOLD_MS} (a week)"));
        }
        if value != 0 {
            *field = value;
        }
    }
    for flag in &request.set_flags {
        match flag.as_str() {
            "merge" => next.merge = r.merge,
            "balance" => next.balance = r.balance,
            "paused" => next.paused = r.paused,
            other => {
                return bad(format!(
                    "set_flags: unknown setting {other:?} (merge, balance, paused)"
                ))
            }
        }
    }
    Ok(next)
}

/// The plan moving the range that contains `key` (or plan `id`, when not 0).
fn plan_index(config: &Config, key: &[u8], id: u64) -> Option<usize> {
    config.moves.iter().position(|p| {
        if id != 0 {
            p.id == id
        } else {
            p.range.as_ref().is_some_and(|r| r.contains(key))
        }
    })
}

fn cancel_move(next: &mut Config, request: CancelMove) -> Result<bool, CommandError> {
    if request.plan_id == 0 {
        check_key(&request.key)?;
    }
    let Some(i) = plan_index(next, &request.key, request.plan_id) else {
        return Err(refuse(Code::NotFound, "no move of that range is under way"));
    };
    next.moves.remove(i);
    Ok(true)
}

/// The cutover: the destination has the whole range and the source has frozen it.
fn finish_move(next: &mut Config, request: FinishMove) -> Result<bool, CommandError> {
    if request.plan_id == 0 {
        return Err(refuse(Code::InvalidArgument, "plan_id: must not be 0"));
    }
    let Some(i) = plan_index(next, &[], request.plan_id) else {
        return Err(refuse(
            Code::NotFound,
            format!("move plan {} no longer exists", request.plan_id),
        ));
    };
    let plan = next.moves.remove(i);
    let r = next
        .ranges
        .iter_mut()
        .find(|r| r.range == plan.range)
        .ok_or_else(|| refuse(Code::Internal, "a plan's range is not in its configuration"))?;
    r.gid = plan.dest;
    Ok(true)
}

/// Addresses in use by any node of any group.
fn addresses(config: &Config) -> HashSet<&str> {
    config
        .groups
        .iter()
        .flat_map(|g| g.nodes.iter().map(|n| n.addr.as_str()))
        .collect()
}

fn validate_group(group: &Group, taken: &mut HashSet<String>) -> Result<(), CommandError> {
    if group.gid == 0 {
        return Err(refuse(Code::InvalidArgument, "gid 0 is reserved"));
    }
    if group.nodes.is_empty() {
        return Err(refuse(
            Code::InvalidArgument,
            format!("group {} has no nodes", group.gid),
        ));
    }
    let mut ids = HashSet::new();
    for node in &group.nodes {
        if node.id == 0 {
            return Err(refuse(Code::InvalidArgument, "node id 0 is reserved"));
        }
        if node.addr.is_empty() {
            return Err(refuse(
                Code::InvalidArgument,
                format!("node {} of group {} has no address", node.id, group.gid),
            ));
        }
        if !ids.insert(node.id) {
            return Err(refuse(
                Code::InvalidArgument,
                format!("node {} appears twice in group {}", node.id, group.gid),
            ));
        }
        if !taken.insert(node.addr.clone()) {
            return Err(refuse(
                Code::AlreadyExists,
                format!("address {} is already used by another node", node.addr),
            ));
        }
    }
    Ok(())
}

/// Balances the ranges over the groups that are not leaving.
fn rebalance_config(config: &mut Config) {
    let groups: BTreeSet<u64> = config
        .groups
        .iter()
        .filter(|g| !g.leaving)
        .map(|g| g.gid)
        .collect();
    let mut owners: Vec<u64> = config.ranges.iter().map(|r| r.gid).collect();
    rebalance(&mut owners, &groups);
    for (r, owner) in config.ranges.iter_mut().zip(owners) {
        r.gid = owner;
    }
}

/// A plan's id: unique, as configuration numbers only grow.
fn plan_id(config_num: u64, range_index: usize) -> u64 {
    (config_num << 16) | range_index as u64
}

/// Starts queued plans whose source and destination take part in no other move, in
/// order: each group moves one range at a time, so many cutovers never stall it.
fn activate_queued(next: &mut Config) {
    let mut busy: HashSet<u64> = next
        .moves
        .iter()
        .filter(|p| !p.queued)
        .flat_map(|p| [p.source, p.dest])
        .collect();
    for plan in next.moves.iter_mut().filter(|p| p.queued) {
        if !busy.contains(&plan.source) && !busy.contains(&plan.dest) {
            plan.queued = false;
            busy.extend([plan.source, plan.dest]);
        }
    }
}

fn join(next: &mut Config, request: Join) -> Result<bool, CommandError> {
    if request.groups.is_empty() {
        return Err(refuse(Code::InvalidArgument, "join names no groups"));
    }
    let mut taken: HashSet<String> = addresses(next).into_iter().map(str::to_owned).collect();
    let mut gids = HashSet::new();
    for group in &request.groups {
        if next.group(group.gid).is_some() || !gids.insert(group.gid) {
            return Err(refuse(
                Code::AlreadyExists,
                format!("group {} already exists", group.gid),
            ));
        }
        validate_group(group, &mut taken)?;
    }
    let live: HashSet<u64> = next.groups.iter().map(|g| g.gid).collect();
    // Moves of leaving groups that have not started are planned again toward the
    // balance that includes the new groups.
    let leaving = leaving_groups(next);
    next.moves
        .retain(|p| !(p.queued && leaving.contains(&p.source)));
    next.groups.extend(request.groups);
    next.groups.sort_by_key(|g| g.gid);
    let mut target = next.clone();
    rebalance_config(&mut target);
    for (i, (range, goal)) in next.ranges.iter_mut().zip(target.ranges).enumerate() {
        let moving = next.moves.iter().any(|p| p.range == range.range);
        if range.gid == goal.gid || moving {
            continue;
        }
        // A range nobody owned has no data to move.
        if request.immediate || !live.contains(&range.gid) {
            range.gid = goal.gid;
            continue;
        }
        next.moves.push(MovePlan {
            id: plan_id(next.num, i),
            range: range.range.clone(),
            source: range.gid,
            dest: goal.gid,
            queued: true,
            ..Default::default()
        });
    }
    Ok(true)
}

fn leave(next: &mut Config, request: Leave) -> Result<bool, CommandError> {
    if request.gids.is_empty() {
        return Err(refuse(Code::InvalidArgument, "leave names no groups"));
    }
    let leaving: HashSet<u64> = request.gids.iter().copied().collect();
    for gid in &leaving {
        if next.group(*gid).is_none() {
            return Err(refuse(
                Code::NotFound,
                format!("group {gid} does not exist"),
            ));
        }
    }
    let staying = next
        .groups
        .iter()
        .filter(|g| !g.leaving && !leaving.contains(&g.gid))
        .count();
    if staying == 0 {
        return Err(refuse(
            Code::FailedPrecondition,
            "cannot remove every group: the data would have nowhere to go",
        ));
    }
    if request.immediate {
        next.groups.retain(|g| !leaving.contains(&g.gid));
        rebalance_config(next);
        return Ok(true);
    }
    let mut changed = false;
    for group in next.groups.iter_mut().filter(|g| leaving.contains(&g.gid)) {
        changed |= !group.leaving;
        group.leaving = true;
    }
    // The ranges move in `drain_leaving`, which every new configuration runs.
    Ok(changed)
}

fn leaving_groups(config: &Config) -> HashSet<u64> {
    config
        .groups
        .iter()
        .filter(|g| g.leaving)
        .map(|g| g.gid)
        .collect()
}

/// Gives the ranges of leaving groups live moves (queued: one move per group at a
/// time) toward the balanced assignment of the staying groups, and removes a leaving
/// group once it owns no range and takes part in no move. Runs for every
/// configuration, so a leave's move that was cancelled (its destination stalled) is
/// planned again.
fn drain_leaving(next: &mut Config) {
    let leaving = leaving_groups(next);
    if leaving.is_empty() {
        return;
    }
    let unplanned = |config: &Config, r: &RangeAssignment| {
        leaving.contains(&r.gid) && !config.moves.iter().any(|p| p.range == r.range)
    };
    if next.ranges.iter().any(|r| unplanned(next, r)) {
        let mut target = next.clone();
        rebalance_config(&mut target);
        for (i, goal) in target.ranges.iter().enumerate() {
            let range = &next.ranges[i];
            if !unplanned(next, range) {
                continue;
            }
            let plan = MovePlan {
                id: plan_id(next.num, i),
                range: range.range.clone(),
                source: range.gid,
                dest: goal.gid,
                queued: true,
                ..Default::default()
            };
            next.moves.push(plan);
        }
    }
    let busy: HashSet<u64> = next
        .ranges
        .iter()
        .map(|r| r.gid)
        .chain(next.moves.iter().flat_map(|p| [p.source, p.dest]))
        .collect();
    next.groups.retain(|g| !g.leaving || busy.contains(&g.gid));
}

fn check_key(key: &[u8]) -> Result<(), CommandError> {
    if key.is_empty() {
        return Err(refuse(Code::InvalidArgument, "key: must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(refuse(
            Code::InvalidArgument,
            format!("key: longer than {MAX_KEY_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn move_range(next: &mut Config, request: Move) -> Result<bool, CommandError> {
    check_key(&request.key)?;
    match next.group(request.gid) {
        None => {
            return Err(refuse(
                Code::NotFound,
                format!("group {} does not exist", request.gid),
            ))
        }
        Some(g) if g.leaving => {
            return Err(refuse(
                Code::FailedPrecondition,
                format!("group {} is leaving: it takes no ranges", request.gid),
            ))
        }
        Some(_) => {}
    }
    let i = next.range_index(&request.key);
    let owner = next.ranges[i].gid;
    let mut cancelled = false;
    if let Some(p) = plan_index(next, &request.key, 0) {
        let plan = &next.moves[p];
        if request.immediate {
            next.moves.remove(p);
            cancelled = true;
        } else if plan.dest == request.gid {
            return Ok(false);
        } else {
            return Err(refuse(
                Code::FailedPrecondition,
                format!(
                    "range {} is already moving to group {}; cancel that move first",
                    plan.range.clone().unwrap_or_default(),
                    plan.dest
                ),
            ));
        }
    }
    if owner == request.gid {
        return Ok(cancelled);
    }
    // A range nobody owns has no data to copy.
    if request.immediate || owner == 0 {
        next.ranges[i].gid = request.gid;
        return Ok(true);
    }
    next.moves.push(MovePlan {
        id: plan_id(next.num, i),
        range: next.ranges[i].range.clone(),
        source: owner,
        dest: request.gid,
        ..Default::default()
    });
    Ok(true)
}

fn split(next: &mut Config, request: Split) -> Result<bool, CommandError> {
    check_key(&request.key)?;
    let i = next.range_index(&request.key);
    let owner = next.ranges[i].gid;
    let range = next.ranges[i].range.clone().unwrap_or_else(KeyRange::full);
    if plan_index(next, &request.key, 0).is_some() {
        return Err(refuse(
            Code::FailedPrecondition,
            format!("range {range} is moving; split it after the move (or cancel it)"),
        ));
    }
    if range.start == request.key {
        return Err(refuse(
            Code::AlreadyExists,
            format!(
                "{:?} is already a range boundary",
                String::from_utf8_lossy(&request.key)
            ),
        ));
    }
    next.ranges[i].range = Some(KeyRange {
        start: range.start,
        end: request.key.clone(),
    });
    next.ranges.insert(
        i + 1,
        RangeAssignment {
            range: Some(KeyRange {
                start: request.key,
                end: range.end,
            }),
            gid: owner,
        },
    );
    Ok(true)
}

fn group_mut(next: &mut Config, gid: u64) -> Result<&mut Group, CommandError> {
    next.groups
        .iter_mut()
        .find(|g| g.gid == gid)
        .ok_or_else(|| refuse(Code::NotFound, format!("group {gid} does not exist")))
}

fn add_node(next: &mut Config, request: AddNode) -> Result<bool, CommandError> {
    let node = request
        .node
        .ok_or_else(|| refuse(Code::InvalidArgument, "node: missing"))?;
    if node.id == 0 || node.addr.is_empty() {
        return Err(refuse(
            Code::InvalidArgument,
            "node: needs a non-zero id and an address",
        ));
    }
    if addresses(next).contains(node.addr.as_str()) {
        return Err(refuse(
            Code::AlreadyExists,
            format!("address {} is already used by another node", node.addr),
        ));
    }
    let group = group_mut(next, request.gid)?;
    if group.nodes.iter().any(|n| n.id == node.id) {
        return Err(refuse(
            Code::AlreadyExists,
            format!("node {} is already in group {}", node.id, request.gid),
        ));
    }
    group.nodes.push(node);
    group.nodes.sort_by_key(|n| n.id);
    Ok(true)
}

fn remove_node(next: &mut Config, request: RemoveNode) -> Result<bool, CommandError> {
    let group = group_mut(next, request.gid)?;
    let before = group.nodes.len();
    if !group.nodes.iter().any(|n| n.id == request.node_id) {
        return Err(refuse(
            Code::NotFound,
            format!("node {} is not in group {}", request.node_id, request.gid),
        ));
    }
    if before == 1 {
        return Err(refuse(
            Code::FailedPrecondition,
            format!(
                "node {} is the last node of group {}; remove the group with leave",
                request.node_id, request.gid
            ),
        ));
    }
    group.nodes.retain(|n| n.id != request.node_id);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Node;

    fn group(gid: u64, ids: &[u64]) -> Group {
        Group {
            gid,
            leaving: false,
            nodes: ids
                .iter()
                .map(|id| Node {
                    id: *id,
                    addr: format!("127.0.0.1:{}", 8000 + gid * 10 + id),
                })
                .collect(),
        }
    }

    fn join_cmd(groups: Vec<Group>) -> Command {
        Command::Join(Join {
            groups,
            id: None,
            immediate: true,
        })
    }

    fn apply(config: &Config, command: Command) -> Config {
        next_config(config, command).unwrap().unwrap()
    }

    fn code(result: Result<Option<Config>, CommandError>) -> Code {
        Code::from_i32(result.expect_err("should be refused").code)
    }

    fn split_at(config: &Config, key: &str) -> Config {
        apply(
            config,
            Command::Split(Split {
                key: key.into(),
                id: None,
            }),
        )
    }

    #[test]
    fn join_split_move_leave_keep_ranges_covering_the_key_space() {
        let c0 = Config::initial();
        let c1 = apply(&c0, join_cmd(vec![group(1, &[1, 2, 3])]));
        assert_eq!(c1.num, 1);
        assert_eq!(c1.ranges[0].gid, 1);
        let c2 = split_at(&c1, "g");
        let c3 = split_at(&c2, "n");
        let c4 = split_at(&c3, "t");
        assert_eq!(c4.ranges.len(), 4);
        assert!(c4.ranges.iter().all(|r| r.gid == 1), "split moves no data");
        let c5 = apply(&c4, join_cmd(vec![group(2, &[1, 2, 3])]));
        let count = |c: &Config, gid| c.ranges.iter().filter(|r| r.gid == gid).count();
        assert_eq!((count(&c5, 1), count(&c5, 2)), (2, 2));
        assert_ne!(c5.owner(b"apple").1, c5.owner(b"zebra").1);
        let c6 = apply(
            &c5,
            Command::Move(Move {
                key: b"apple".to_vec(),
                gid: 2,
                immediate: true,
                id: None,
            }),
        );
        assert_eq!(c6.owner(b"apple").1, 2);
        let c7 = apply(
            &c6,
            Command::Leave(Leave {
                gids: vec![2],
                id: None,
                immediate: true,
            }),
        );
        assert!(c7.ranges.iter().all(|r| r.gid == 1));
        // Bounds still chain from "" to +inf.
        let mut expected_start: Vec<u8> = Vec::new();
        for r in &c7.ranges {
            let range = r.range.as_ref().unwrap();
            assert_eq!(range.start, expected_start);
            expected_start = range.end.clone();
        }
        assert!(expected_start.is_empty());
    }

    #[test]
    fn bad_input_is_refused() {
        let c1 = apply(&Config::initial(), join_cmd(vec![group(1, &[1, 2, 3])]));
        let cases: Vec<(Command, Code)> = vec![
            (join_cmd(vec![group(1, &[4])]), Code::AlreadyExists),
            (
                join_cmd(vec![Group {
                    gid: 5,
                    leaving: false,
                    nodes: vec![],
                }]),
                Code::InvalidArgument,
            ),
            (join_cmd(vec![]), Code::InvalidArgument),
            (join_cmd(vec![group(0, &[1])]), Code::InvalidArgument),
            (
                join_cmd(vec![group(2, &[1]), group(2, &[2])]),
                Code::AlreadyExists,
            ),
            (
                join_cmd(vec![Group {
                    gid: 7,
                    leaving: false,
                    nodes: vec![Node {
                        id: 1,
                        addr: "127.0.0.1:8011".into(),
                    }],
                }]),
                Code::AlreadyExists,
            ),
            (
                Command::Leave(Leave {
                    gids: vec![9],
                    id: None,
                    immediate: true,
                }),
                Code::NotFound,
            ),
            (
                Command::Leave(Leave {
                    gids: vec![1],
                    id: None,
                    immediate: true,
                }),
                Code::FailedPrecondition,
            ),
            (
                Command::Move(Move {
                    key: b"a".to_vec(),
                    gid: 9,
                    immediate: true,
                    id: None,
                }),
                Code::NotFound,
            ),
            (
                Command::Split(Split {
                    key: vec![],
                    id: None,
                }),
                Code::InvalidArgument,
            ),
            (
                Command::Split(Split {
                    key: vec![b'k'; MAX_KEY_BYTES + 1],
                    id: None,
                }),
                Code::InvalidArgument,
            ),
            (
                Command::RemoveNode(RemoveNode {
                    gid: 1,
                    node_id: 9,
                    id: None,
                }),
                Code::NotFound,
            ),
        ];
        for (command, expected) in cases {
            let text = format!("{command:?}");
            assert_eq!(code(next_config(&c1, command)), expected, "{text}");
        }
        let c2 = split_at(&c1, "m");
        assert_eq!(
            code(next_config(
                &c2,
                Command::Split(Split {
                    key: b"m".to_vec(),
                    id: None
                })
            )),
            Code::AlreadyExists
        );
        let single = apply(&c1, join_cmd(vec![group(3, &[1])]));
        assert_eq!(
            code(next_config(
                &single,
                Command::RemoveNode(RemoveNode {
                    gid: 3,
                    node_id: 1,
                    id: None
                })
            )),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn membership_edits_change_only_the_member_list() {
        let c1 = apply(&Config::initial(), join_cmd(vec![group(1, &[1, 2, 3])]));
        let c2 = apply(
            &c1,
            Command::AddNode(AddNode {
                gid: 1,
                node: Some(Node {
                    id: 4,
                    addr: "127.0.0.1:9999".into(),
                }),
                id: None,
            }),
        );
        assert_eq!(c2.group(1).unwrap().nodes.len(), 4);
        assert_eq!(c2.ranges, c1.ranges);
        let c3 = apply(
            &c2,
            Command::RemoveNode(RemoveNode {
                gid: 1,
                node_id: 2,
                id: None,
            }),
        );
        let ids: Vec<u64> = c3.group(1).unwrap().nodes.iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![1, 3, 4]);
    }

    #[test]
    fn a_live_move_is_a_plan_until_finished_or_cancelled() {
        let c1 = apply(&Config::initial(), join_cmd(vec![group(1, &[1])]));
        let c2 = split_at(&c1, "n");
        let c3 = apply(&c2, join_cmd(vec![group(2, &[1]), group(3, &[1])]));
        let (range, src) = c3.owner(b"a");
        let (range, src) = (range.clone(), src);
        let others: Vec<u64> = [1, 2, 3].into_iter().filter(|g| *g != src).collect();
        let (dst, other) = (others[0], others[1]);
        let live = |key: &[u8], gid| {
            Command::Move(Move {
                key: key.to_vec(),
                gid,
                id: None,
                immediate: false,
            })
        };
        let c4 = apply(&c3, live(b"a", dst));
        assert_eq!(c4.owner(b"a").1, src, "a plan changes no owner");
        assert_eq!(c4.moves.len(), 1);
        let plan = c4.moves[0].clone();
        let index = c4.range_index(b"a");
        assert_eq!(
            (plan.id, plan.source, plan.dest),
            (plan_id(4, index), src, dst)
        );
        assert_eq!(plan.range.as_ref(), Some(&range));
        // The same move again changes nothing; another destination, a split of the
        // range, and finishing a plan that does not exist are refused.
        assert_eq!(next_config(&c4, live(b"a", dst)).unwrap(), None);
        assert_eq!(
            code(next_config(&c4, live(b"a", other))),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(next_config(
                &c4,
                Command::Split(Split {
                    key: b"b".to_vec(),
                    id: None
                })
            )),
            Code::FailedPrecondition
        );
        let finish = |id| Command::FinishMove(FinishMove { plan_id: id });
        assert_eq!(code(next_config(&c4, finish(99))), Code::NotFound);
        // Finished: the owner changes and the plan goes.
        let c5 = apply(&c4, finish(plan.id));
        assert_eq!(c5.owner(b"a").1, dst);
        assert!(c5.moves.is_empty());
        // Cancelled: the owner stays; cancelling again finds nothing.
        let cancel = |key: &[u8]| {
            Command::CancelMove(CancelMove {
                key: key.to_vec(),
                ..Default::default()
            })
        };
        let c5 = apply(&c4, cancel(b"c"));
        assert_eq!(c5.owner(b"a").1, src);
        assert!(c5.moves.is_empty());
        assert_eq!(code(next_config(&c5, cancel(b"c"))), Code::NotFound);
        assert_eq!(code(next_config(&c5, finish(plan.id))), Code::NotFound);
        // The destination leaving voids the plan (the source still has the range).
        let c5 = apply(
            &c4,
            Command::Leave(Leave {
                gids: vec![dst],
                id: None,
                immediate: true,
            }),
        );
        assert!(c5.moves.is_empty());
        // An immediate move replaces the plan.
        let mut immediate = live(b"a", other);
        if let Command::Move(r) = &mut immediate {
            r.immediate = true;
        }
        let c5 = apply(&c4, immediate);
        assert_eq!(c5.owner(b"a").1, other);
        assert!(c5.moves.is_empty());
    }

    #[test]
    fn a_live_join_moves_one_range_per_group_at_a_time() {
        let mut c = apply(&Config::initial(), join_cmd(vec![group(1, &[1])]));
        for key in ["g", "n", "t"] {
            c = split_at(&c, key);
        }
        let joined = apply(
            &c,
            Command::Join(Join {
                groups: vec![group(2, &[1])],
                id: None,
                immediate: false,
            }),
        );
        assert!(
            joined.ranges.iter().all(|r| r.gid == 1),
            "nothing moved yet"
        );
        assert_eq!(joined.moves.len(), 2, "{:?}", joined.moves);
        let active: Vec<&MovePlan> = joined.moves.iter().filter(|p| !p.queued).collect();
        assert_eq!(active.len(), 1, "one move per group at a time");
        let first = active[0].id;
        let next = apply(&joined, Command::FinishMove(FinishMove { plan_id: first }));
        assert_eq!(next.moves.len(), 1);
        assert!(!next.moves[0].queued, "the next move starts when one ends");
        let done = apply(
            &next,
            Command::FinishMove(FinishMove {
                plan_id: next.moves[0].id,
            }),
        );
        assert!(done.moves.is_empty());
        assert_eq!(range_counts(&done), [(1, 2), (2, 2)].into());
    }

    fn range_counts(c: &Config) -> std::collections::BTreeMap<u64, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for r in &c.ranges {
            *counts.entry(r.gid).or_default() += 1;
        }
        counts
    }

    #[test]
    fn move_to_the_current_owner_changes_nothing() {
        let c1 = apply(&Config::initial(), join_cmd(vec![group(1, &[1])]));
        let same = next_config(
            &c1,
            Command::Move(Move {
                key: b"a".to_vec(),
                gid: 1,
                immediate: true,
                id: None,
            }),
        );
        assert_eq!(same.unwrap(), None);
    }

    /// A key in a range that `gid` owns.
    fn key_owned_by(c: &Config, gid: u64) -> Vec<u8> {
        let range = c.ranges.iter().find(|r| r.gid == gid).unwrap();
        let mut key = range.range.clone().unwrap().start;
        key.push(b'0');
        key
    }

    #[test]
    fn a_live_leave_moves_ranges_one_at_a_time_then_removes_the_group() {
        let mut c = apply(&Config::initial(), join_cmd(vec![group(1, &[1])]));
        for key in ["g", "n", "t"] {
            c = split_at(&c, key);
        }
        let c = apply(&c, join_cmd(vec![group(2, &[1]), group(3, &[1])]));
        let owned_by_1 = range_counts(&c)[&1];
        assert!(owned_by_1 >= 1);
        let leave = |gids: Vec<u64>| {
            Command::Leave(Leave {
                gids,
                id: None,
                immediate: false,
            })
        };
        let mut left = apply(&c, leave(vec![1]));
        assert!(
            left.group(1).unwrap().leaving,
            "still listed while it drains"
        );
        assert_eq!(range_counts(&left), range_counts(&c), "nothing moved yet");
        assert_eq!(left.moves.len(), owned_by_1);
        assert!(left.moves.iter().all(|p| p.source == 1 && p.dest != 1));
        assert_eq!(left.moves.iter().filter(|p| !p.queued).count(), 1);
        // Leaving again changes nothing; a range cannot be moved to a leaving group;
        // the last staying groups cannot leave.
        assert_eq!(next_config(&left, leave(vec![1])).unwrap(), None);
        let to_leaving = Command::Move(Move {
            key: key_owned_by(&left, 2),
            gid: 1,
            id: None,
            immediate: false,
        });
        assert_eq!(
            code(next_config(&left, to_leaving)),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(next_config(&left, leave(vec![2, 3]))),
            Code::FailedPrecondition
        );
        // A cancelled move of a leaving group is planned again at once (the group
        // must drain; its source serves the range meanwhile).
        let first = left.moves.iter().find(|p| !p.queued).unwrap().clone();
        let cancelled = apply(
            &left,
            Command::CancelMove(CancelMove {
                plan_id: first.id,
                ..Default::default()
            }),
        );
        assert_eq!(cancelled.moves.len(), owned_by_1);
        assert!(cancelled
            .moves
            .iter()
            .any(|p| p.range == first.range && p.id != first.id));
        // Finishing every plan drains the group; the last one removes it.
        while let Some(plan) = left.moves.iter().find(|p| !p.queued).cloned() {
            assert!(left.group(1).is_some(), "removed before it drained");
            left = apply(&left, Command::FinishMove(FinishMove { plan_id: plan.id }));
        }
        assert!(left.moves.is_empty(), "{:?}", left.moves);
        assert!(left.group(1).is_none(), "a drained group is removed");
        let counts = range_counts(&left);
        assert!(!counts.contains_key(&1));
        assert!(counts.values().max().unwrap() - counts.values().min().unwrap() <= 1);
    }

    #[test]
    fn a_leaving_group_takes_no_ranges_and_loses_the_plans_into_it() {
        let mut c = apply(&Config::initial(), join_cmd(vec![group(1, &[1])]));
        for key in ["g", "n", "t"] {
            c = split_at(&c, key);
        }
        let c = apply(&c, join_cmd(vec![group(2, &[1])]));
        // A live move into group 2, then group 2 leaves: the plan is void (the range
        // stays with its source) and group 2's own ranges move back.
        let key = key_owned_by(&c, 1);
        let planned = apply(
            &c,
            Command::Move(Move {
                key: key.clone(),
                gid: 2,
                id: None,
                immediate: false,
            }),
        );
        let left = apply(
            &planned,
            Command::Leave(Leave {
                gids: vec![2],
                id: None,
                immediate: false,
            }),
        );
        assert_eq!(left.owner(&key).1, 1);
        assert!(left.moves.iter().all(|p| p.source == 2 && p.dest == 1));
        // A group joining meanwhile gets ranges; the leaving one none.
        let joined = apply(
            &left,
            Command::Join(Join {
                groups: vec![group(3, &[1])],
                id: None,
                immediate: false,
            }),
        );
        assert!(joined.moves.iter().all(|p| p.dest != 2));
        assert!(joined.moves.iter().any(|p| p.dest == 3));
    }

    #[test]
    fn scheduler_settings_refuse_bad_values_and_change_nothing() {
        let current = placement::default_settings();
        let set = |settings: SchedulerSettings, flags: &[&str]| {
            updated(
                &current,
                SetScheduler {
                    settings: Some(settings),
                    set_flags: flags.iter().map(|f| f.to_string()).collect(),
                    id: None,
                },
            )
        };
        let none = SchedulerSettings::default();
        for (bad, field) in [
            (
                SchedulerSettings {
                    split_bytes: 1,
                    ..none
                },
                "split_bytes",
            ),
            (
                SchedulerSettings {
                    split_load: f64::NAN,
                    ..none
                },
                "split_load",
            ),
            (
                SchedulerSettings {
                    split_load: -3.0,
                    ..none
                },
                "split_load",
            ),
            (
                SchedulerSettings {
                    hold_ms: u64::MAX,
                    ..none
                },
                "hold_ms",
            ),
        ] {
            let e = set(bad, &[]).expect_err(field);
            assert_eq!(Code::from_i32(e.code), Code::InvalidArgument);
            assert!(e.message.starts_with(field), "{}", e.message);
        }
        let e = set(none, &["merge", "sideways"]).unwrap_err();
        assert!(e.message.contains("\"sideways\""), "{}", e.message);
        // Zeros and unnamed flags leave the rest as it was.
        let pause = SchedulerSettings {
            split_bytes: 4 << 20,
            paused: true,
            merge: false,
            ..none
        };
        let s = set(pause, &["paused"]).unwrap();
        assert_eq!(s.split_bytes, 4 << 20);
        assert!(s.paused && s.merge && s.balance);
        assert_eq!(s.split_load, current.split_load);
    }

    #[test]
    fn a_round_is_one_configuration_and_the_history_stays_bounded() {
        use crate::storage::{Engine, Identity};
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity {
            cluster: "t".into(),
            role: "shardmaster".into(),
            group: 0,
            node: 1,
        };
        let (_, store) = Engine::open(dir.path(), &identity)
            .unwrap()
            .into_stores()
            .unwrap();
        let mut state = MasterState::new();
        state.restore(&store).unwrap();
        let mut index = 10;
        let mut run = |state: &mut MasterState, command: Command, at_ms: u64| {
            index += 1;
            let mut batch = store.batch();
            let command = MasterCommand {
                command: Some(command),
                at_ms,
            };
            let out = state.apply(index, command, &mut batch).unwrap();
            store.commit(batch, (index, 1), None).unwrap();
            out
        };
        run(&mut state, join_cmd(vec![group(1, &[1])]), 0).unwrap();
        run(&mut state, join_cmd(vec![group(2, &[1])]), 0).unwrap();
        let split = |state: &MasterState, at: &str| PlacementDecision {
            kind: Kind::Split as i32,
            range: Some(state_range(state, at)),
            at: at.into(),
            why: "test".into(),
            ..Default::default()
        };
        // An operator's split is recorded as manual, with the proposer's clock.
        run(
            &mut state,
            Command::Split(Split {
                key: "m".into(),
                id: None,
            }),
            99,
        )
        .unwrap();
        let last = state.history().pop().unwrap();
        assert!(last.manual && last.at_ms == 99);
        assert_eq!(state.recent().last().unwrap().event, Event::ManualSplit);
        let before = state.latest().num;
        let round = ScheduleCommand {
            decisions: vec![split(&state, "c"), split(&state, "x")],
            at_ms: 77,
        };
        run(&mut state, Command::Schedule(round.clone()), 0).unwrap();
        assert_eq!(
            state.latest().num,
            before + 1,
            "one configuration for the round"
        );
        assert_eq!(state.latest().ranges.len(), 4);
        let h = state.history();
        assert_eq!(h.len(), 3);
        assert!(h[1..]
            .iter()
            .all(|d| d.at_ms == 77 && d.config_num == before + 1));
        // The same round again fits nothing: no configuration, no history.
        run(&mut state, Command::Schedule(round), 0).unwrap();
        assert_eq!((state.latest().num, state.history().len()), (before + 1, 3));
        for i in 0..MAX_HISTORY + 5 {
            let key = format!("z{i:04}");
            let round = ScheduleCommand {
                decisions: vec![split(&state, &key)],
                at_ms: i as u64,
            };
            run(&mut state, Command::Schedule(round), 0).unwrap();
        }
        assert_eq!(state.history().len(), MAX_HISTORY);
        // The settings and the history survive a restart.
        run(
            &mut state,
            Command::SetScheduler(SetScheduler {
                settings: Some(SchedulerSettings {
                    split_bytes: 1 << 20,
                    ..Default::default()
                }),
                set_flags: Vec::new(),
                id: None,
            }),
            0,
        )
        .unwrap();
        let mut again = MasterState::new();
        again.restore(&store).unwrap();
        assert_eq!(again.history(), state.history());
        assert_eq!(again.settings().split_bytes, 1 << 20);
    }

    fn state_range(state: &MasterState, key: &str) -> KeyRange {
        state.latest().owner(key.as_bytes()).0.clone()
    }
}
