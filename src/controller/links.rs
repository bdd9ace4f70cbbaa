//! How a candidate is reached from the VM's source node: the transport the relays on both
//! ends allow and the rate the migration gets there (what the source's relay measured to it
//! while recent enough, else the configured rate, within KubeVirt's `bandwidthPerMigration`).
//! The same link feeds each candidate's `estimatedSeconds` in status and the planner's
//! shorter-move rule, so what status shows is what the ranking used.

use std::sync::Arc;

use super::status::{self, TransferModel};
use crate::api::digest::NodeRegionDigestStatus;
use crate::api::{time, NodeRegionDigest};
use crate::plan::estimate::{choose_bandwidth, BandwidthCap, EstimateInput, Transport};
use crate::plan::move_time::{Link, MoveLinks};
use crate::plan::{VmRegionSummary, VmRequest};
use crate::view::ClusterView;

/// Links from one source node, read from the view at one moment.
#[derive(Clone)]
pub struct SourceLinks {
    view: ClusterView,
    transfer: TransferModel,
    cap: Option<BandwidthCap>,
    kubevirt_blocks: Option<&'static str>,
    now: time::Timestamp,
    source: String,
    source_digest: Option<Arc<NodeRegionDigest>>,
}

impl SourceLinks {
    pub fn new(
        view: &ClusterView,
        transfer: TransferModel,
        cap: Option<BandwidthCap>,
        source: &str,
    ) -> Self {
        Self {
            view: view.clone(),
            transfer,
            cap,
            kubevirt_blocks: view.kubevirt_blocks_relay(),
            now: time::Timestamp::now(),
            source: source.to_string(),
            source_digest: view.digest(source),
        }
    }

    fn source_status(&self) -> Option<&NodeRegionDigestStatus> {
        self.source_digest
            .as_deref()
            .and_then(|d| d.status.as_ref())
    }

    /// The link to `target`.
    pub fn link(&self, target: &str) -> Link {
        let digest = self.view.digest(target);
        let target_status = digest.as_deref().and_then(|d| d.status.as_ref());
        let source = self.source_status();
        let (transport, _) = status::transport(
            (&self.source, source),
            (target, target_status),
            self.kubevirt_blocks,
        );
        let measured = status::measured_bandwidth(source, target_status, self.now);
        let bytes_per_second = choose_bandwidth(
            self.transfer.bandwidth,
            measured.as_ref().map(|m| m.0),
            self.transfer.measured_rate_max_age,
            self.cap.as_ref(),
        )
        .bytes_per_second;
        Link {
            bytes_per_second,
            transport,
        }
    }

    /// The planner's view of every candidate's move for `request` (see
    /// [`crate::plan::move_time`]): the VM's memory and activity from its summary, the link
    /// per node from here.
    pub fn move_links(
        self,
        request: &VmRequest,
        summary: Option<&VmRegionSummary>,
        region_bytes: u64,
    ) -> MoveLinks {
        let memory = summary.map_or(request.memory_bytes, |s| s.memory_bytes);
        let mut base = EstimateInput::new(
            memory,
            summary.map_or(0.0, |s| s.dirty_rate),
            self.transfer.bandwidth,
        );
        base.zero_bytes = summary.map_or(0, |s| (s.zero_regions * region_bytes).min(memory));
        base.working_set_bytes = summary.map_or(0, |s| s.working_set_bytes);
        base.downtime_limit_ms = self.transfer.downtime_limit_ms;
        base.transport = Transport::Stock;
        MoveLinks {
            base,
            link_of: Arc::new(move |node| self.link(node)),
        }
    }
}
