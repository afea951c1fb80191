package wire

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"
	"time"
)

// RunID is a run's id: a UUIDv7 in its canonical text form. Being time-ordered keeps
// inserts into the primary key index local.
type RunID = string

var v7 struct {
	sync.Mutex
	lastMS  int64
	counter uint16 // 12-bit sequence within one millisecond (RFC 9562 method 1)
}

// NewRunID returns a fresh UUIDv7. Ids made by one process are strictly increasing.
func NewRunID() RunID {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("wire: crypto/rand failed: %v", err)) // the runtime cannot recover from this
	}
	v7.Lock()
	ms := time.Now().UnixMilli()
	if ms <= v7.lastMS {
		v7.counter++
		if v7.counter > 0x0fff {
			v7.lastMS++
			v7.counter = 0
		}
		ms = v7.lastMS
	} else {
		v7.lastMS = ms
		v7.counter = uint16(b[6])<<4 | uint16(b[7]>>4) // random start keeps ids unguessable
		v7.counter &= 0x07ff                           // leave room to count up
	}
	seq := v7.counter
	v7.Unlock()

	b[0], b[1], b[2] = byte(ms>>40), byte(ms>>32), byte(ms>>24)
	b[3], b[4], b[5] = byte(ms>>16), byte(ms>>8), byte(ms)
	b[6] = 0x70 | byte(seq>>8)
	b[7] = byte(seq)
	b[8] = (b[8] & 0x3f) | 0x80
	return formatUUID(b)
}

func formatUUID(b [16]byte) string {
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}

// ValidRunID reports whether s is a canonical, lower-case UUID text.
func ValidRunID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < 36; i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
}
