package sdk

import "sync"

// submits remembers where this client's recent submits wait in the submit stream (the
// sequence of each one's publish acknowledgement), so that Describe and Wait can tell a
// run whose start no scheduler has committed yet from one that does not exist. Bounded:
// the oldest are forgotten first, and a run once read is forgotten at once.
type submits struct {
	mu    sync.Mutex
	seq   map[string]uint64
	order []string // ring of the ids in seq, oldest at next
	next  int
}

// submitsKept bounds how many submits a client remembers.
const submitsKept = 4096

func (s *submits) add(id string, seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.seq == nil {
		s.seq = make(map[string]uint64)
		s.order = make([]string, submitsKept)
	}
	if old := s.order[s.next]; old != "" {
		delete(s.seq, old)
	}
	s.order[s.next], s.seq[id] = id, seq
	s.next = (s.next + 1) % submitsKept
}

// get is the sequence of id's submit, 0 when unknown.
func (s *submits) get(id string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seq[id]
}

// forget drops id; its slot in the ring is reused when its turn comes.
func (s *submits) forget(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.seq, id)
}
