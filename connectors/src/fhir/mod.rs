//! FHIR R4 REST connector (GP systems, councils, the demographics service, any FHIR source).
mod config;
pub use config::FhirConfig;

/// Placeholder until the FHIR client lands.
#[derive(Debug)]
pub struct FhirConnector;

impl FhirConnector {
    pub fn new(_d: crate::SourceDescriptor, _c: FhirConfig) -> Result<Self, String> {
        Err("fhir connector not built yet".into())
    }
}

impl crate::Connector for FhirConnector {
    fn descriptor(&self) -> &crate::SourceDescriptor {
        unreachable!("placeholder: never constructed")
    }

    fn fetch(
        &self,
        _q: crate::SourceQuery,
    ) -> futures::future::BoxFuture<'static, Result<crate::SourceRecord, crate::ConnectorError>>
    {
        unreachable!("placeholder: never constructed")
    }
}
