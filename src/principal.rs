//! Who is asking: the verified claims of a caller's token.

use connectors::OdsCode;

/// A caller, as established by a verified bearer token. Not patient data, but `sub` names a
/// member of staff, so it appears in audit records and never in metric labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's id at the issuer (e.g. a UUID or a smartcard UUID).
    pub sub: String,
    /// National RBAC role code, e.g. `R8000` (Clinical Practitioner).
    pub role: String,
    /// The caller's organisation's ODS code.
    pub org: OdsCode,
    /// Purpose of use, e.g. `direct-care`.
    pub purpose: String,
}
