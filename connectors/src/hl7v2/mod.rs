//! HL7 v2 over MLLP connector (hospital PAS systems), replies mapped to FHIR R4.
mod config;
pub use config::Hl7v2Config;

/// Placeholder until the HL7 v2 client lands.
#[derive(Debug)]
pub struct Hl7v2Connector;

impl Hl7v2Connector {
    pub fn new(_d: crate::SourceDescriptor, _c: Hl7v2Config) -> Result<Self, String> {
        Err("hl7v2 connector not built yet".into())
    }
}

impl crate::Connector for Hl7v2Connector {
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
