//! What a process lends its stages, by role.
//!
//! A stage kind is a description with no resources of its own: it declares
//! the roles it needs (a store, a way to reach connections, an HTTP client)
//! and the roles it provides (a door other parts of the process use), and
//! takes or gives them while it is built. The process fills a [`Resources`]
//! with what it has; the runtime checks every stage's needs against it
//! before building anything, so a process that lacks a role fails at start
//! with every missing role named, not later in a task.
//!
//! A role is typed ([`Role<T>`]), so a stage gets back exactly the handle the
//! process put in; the runtime stays ignorant of what the handles are.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// A role by name, with the type of its handle. Declare each role once as a
/// `const` beside the trait it hands out, and refer to that const everywhere.
pub struct Role<T: 'static> {
    pub name: &'static str,
    handle: PhantomData<fn() -> T>,
}

impl<T: 'static> Role<T> {
    pub const fn new(name: &'static str) -> Self {
        Role {
            name,
            handle: PhantomData,
        }
    }

    /// The role without its type, as kinds list it in `needs`/`provides`.
    pub const fn id(&self) -> RoleId {
        RoleId(self.name)
    }
}

impl<T: 'static> Clone for Role<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: 'static> Copy for Role<T> {}

impl<T: 'static> fmt::Debug for Role<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Role({})", self.name)
    }
}

/// A role's name, as stage kinds declare it and etcd announcements carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RoleId(pub &'static str);

impl fmt::Display for RoleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Handles by role. Cheap to clone (handles are shared).
#[derive(Clone, Default)]
pub struct Resources {
    by_role: BTreeMap<&'static str, Arc<dyn Any + Send + Sync>>,
}

/// Why a handle could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("no `{0}` here")]
    Missing(&'static str),
    /// Two roles declared with one name and different handle types: a bug
    /// in the declarations, caught the first time the handle is read.
    #[error("`{role}` holds another type than {wanted}")]
    WrongType {
        role: &'static str,
        wanted: &'static str,
    },
}

impl Resources {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lend `handle` as `role` (replacing what was there).
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, role: &Role<T>, handle: T) {
        self.by_role.insert(role.name, Arc::new(handle));
    }

    /// As `insert`, by value, for building a set in one expression.
    pub fn with<T: Clone + Send + Sync + 'static>(mut self, role: &Role<T>, handle: T) -> Self {
        self.insert(role, handle);
        self
    }

    pub fn get<T: Clone + Send + Sync + 'static>(
        &self,
        role: &Role<T>,
    ) -> Result<T, ResourceError> {
        let any = self
            .by_role
            .get(role.name)
            .ok_or(ResourceError::Missing(role.name))?;
        any.downcast_ref::<T>()
            .cloned()
            .ok_or(ResourceError::WrongType {
                role: role.name,
                wanted: std::any::type_name::<T>(),
            })
    }

    pub fn has(&self, role: RoleId) -> bool {
        self.by_role.contains_key(role.0)
    }

    /// The roles held, by name.
    pub fn roles(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.by_role.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NUMBER: Role<Arc<u32>> = Role::new("number");
    const SAME_NAME_OTHER_TYPE: Role<Arc<String>> = Role::new("number");
    const ABSENT: Role<u8> = Role::new("absent");

    #[test]
    fn a_handle_comes_back_as_it_was_lent_and_nothing_else_does() {
        let r = Resources::new().with(&NUMBER, Arc::new(7));
        assert_eq!(*r.get(&NUMBER).unwrap(), 7);
        assert!(r.has(NUMBER.id()));
        assert_eq!(r.get(&ABSENT), Err(ResourceError::Missing("absent")));
        assert!(matches!(
            r.get(&SAME_NAME_OTHER_TYPE),
            Err(ResourceError::WrongType { role: "number", .. })
        ));
    }
}
