package centralsim

// recordLocked marks duplicates of validly signed readings and keeps u
// (unless Options.DiscardUpdates). Caller holds s.mu.
func (s *Server) recordLocked(u *Update) {
	if u.Verdict == VerdictValid {
		k := seenKey{u.Device, u.Seq}
		u.Duplicate = s.seen[k]
		s.seen[k] = true
	}
	if !s.opts.DiscardUpdates {
		s.updates = append(s.updates, *u)
	}
}

// notify calls Options.OnUpdate, outside the lock.
func (s *Server) notify(u Update) {
	if s.opts.OnUpdate != nil {
		s.opts.OnUpdate(u)
	}
}
