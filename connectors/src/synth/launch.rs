//! Starts a simulated server for every source of a region on loopback, each on its own
//! port, and says how to reach each one (the connector configuration the gateway builds from).

use std::{io, net::Ipv4Addr, sync::Arc};

use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    Region,
    model::{Protocol, Records, SourceSpec},
};
use crate::{
    contract::{ConnectorConfig, OdsCode},
    fault::{Fault, FaultSwitch},
    fhir::{self, FhirConfig},
};

/// One running simulated source.
#[derive(Debug)]
pub struct LaunchedSource {
    pub spec: SourceSpec,
    /// How a connector reaches it.
    pub config: ConnectorConfig,
    /// Flips the simulator's fault at run time.
    pub fault: FaultSwitch,
}

/// The running region. Dropping it stops every simulator and closes their connections.
#[derive(Debug)]
pub struct LaunchedRegion {
    /// In the order of [`Region::sources`].
    pub sources: Vec<LaunchedSource>,
    servers: Vec<JoinHandle<()>>,
}

impl LaunchedRegion {
    pub fn source(&self, id: &str) -> Option<&LaunchedSource> {
        self.sources.iter().find(|s| s.spec.id == id)
    }

    pub fn by_ods(&self, ods: &OdsCode) -> Option<&LaunchedSource> {
        self.sources.iter().find(|s| &s.spec.ods == ods)
    }
}

impl Drop for LaunchedRegion {
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

/// Binds one listener per source on 127.0.0.1 (an ephemeral port each) and starts its
/// simulator; `faults` sets a source's initial fault by ODS code (others behave).
pub async fn launch(
    region: Arc<Region>,
    faults: &[(OdsCode, Fault)],
) -> io::Result<LaunchedRegion> {
    let records: Arc<dyn Records> = region.clone();
    let mut launched = LaunchedRegion {
        sources: Vec::with_capacity(region.sources().len()),
        servers: Vec::with_capacity(region.sources().len()),
    };
    for spec in region.sources() {
        let initial = faults
            .iter()
            .find(|(ods, _)| ods == &spec.ods)
            .map(|(_, f)| *f)
            .unwrap_or_default();
        let fault = FaultSwitch::new(initial);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let fhir_config =
            || ConnectorConfig::Fhir(FhirConfig::new(format!("http://127.0.0.1:{port}/fhir")));
        let (server, config) = match spec.protocol {
            Protocol::Fhir => (
                fhir::sim::serve(listener, records.clone(), spec.clone(), fault.clone()),
                fhir_config(),
            ),
            Protocol::Hl7v2 => (
                crate::hl7v2::sim::serve(listener, records.clone(), spec.clone(), fault.clone()),
                ConnectorConfig::Hl7v2(crate::hl7v2::Hl7v2Config::new(format!("127.0.0.1:{port}"))),
            ),
        };
        launched.servers.push(server);
        launched.sources.push(LaunchedSource {
            spec: spec.clone(),
            config,
            fault,
        });
    }
    Ok(launched)
}
