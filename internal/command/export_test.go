package command

import "sort"

// HeldAttrs lists the attributes of device whose command its link may
// still hold (a retained MQTT command not cleared yet).
func (s *Service) HeldAttrs(device string) []string {
	r, err := s.record(device)
	if err != nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for a := range r.Held {
		out = append(out, a)
	}
	sort.Strings(out)
	return out
}
